"""Who is asking, for every dashboard route: the account a user link names, or the
operator behind an admin key or session; and the error pages when neither holds."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlencode

from fastapi import Request
from fastapi.responses import RedirectResponse, Response

from tokenledger.api.deps import ApiState
from tokenledger.dashboard import auth
from tokenledger.dashboard.links import DashboardDisabled, InvalidLink, LinkClaims, verify
from tokenledger.dashboard.render import page, secure
from tokenledger.db.uow import unit_of_work
from tokenledger.errors import TokenLedgerError
from tokenledger.timeutil import utcnow

MAX_FORM_BYTES = 64 * 1024


class PageError(Exception):
    """An answer the dashboard gives as a page: a status, a title and one line."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.title = title
        self.message = message


class LoginNeeded(Exception):
    """No operator signed in: send the browser to the login form, then back."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def api_state(request: Request) -> ApiState:
    """The API process's state (settings, client), built in its lifespan."""
    return request.app.state.api


def user_claims(request: Request, token: str) -> LinkClaims:
    """The account a user link's token names (an error page otherwise)."""
    try:
        return verify(api_state(request).settings, token, utcnow())
    except DashboardDisabled as exc:
        raise PageError(503, "Dashboard links are off", str(exc)) from None
    except InvalidLink as exc:
        raise PageError(403, "This link does not open a dashboard", str(exc)) from None


def operator(request: Request) -> auth.Operator:
    """The operator making this request: an admin key in the header, else a session
    cookie. Without either, the login form (for a page) or 401; another scope, 403."""
    settings = api_state(request).settings
    header = request.headers.get(auth.HEADER)
    with unit_of_work(settings) as uow:
        if header:
            try:
                return auth.from_header(uow.session, header)
            except auth.NotAdmin as exc:
                raise PageError(403, "Admin key needed", str(exc)) from None
            except TokenLedgerError as exc:
                raise PageError(401, "Not signed in", str(exc)) from None
        found = auth.from_cookie(settings, uow.session, request.cookies.get(auth.SESSION_COOKIE),
                                 uow.now)
    if found is None:
        if request.method == "GET":
            raise LoginNeeded(request.url.path + (f"?{request.url.query}"
                                                  if request.url.query else ""))
        raise PageError(401, "Not signed in", "sign in again: your session has ended")
    return found


async def form(request: Request) -> dict[str, str]:
    """An urlencoded form's fields (the first value of each), at most 64 KiB."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise PageError(413, "Form too large", f"a form may hold at most {MAX_FORM_BYTES} "
                                                "bytes")
    try:
        fields = parse_qs(body.decode(), keep_blank_values=True, max_num_fields=200)
    except (UnicodeDecodeError, ValueError):
        raise PageError(400, "Unreadable form", "the form could not be read") from None
    return {k: v[0] for k, v in fields.items()}


def check_csrf(who: auth.Operator, fields: dict[str, str]) -> None:
    """Refuse a form that does not carry this session's CSRF token."""
    if not auth.csrf_ok(who, fields.get("csrf")):
        raise PageError(403, "Form expired", "this form was not sent from this session's "
                                             "page: open the page again and resubmit")


def safe_next(path: str | None) -> str:
    """Where to go after signing in: a dashboard path, never another site."""
    if not path or not path.startswith("/dashboard/") or path.startswith("//") \
            or "\\" in path or any(c in path for c in "\r\n"):
        return "/dashboard/ops/accounts"
    return path


async def on_page_error(request: Request, exc: Exception) -> Response:
    """A PageError as its page, with its status."""
    assert isinstance(exc, PageError)
    return page(request, "error.html", {"title": exc.title, "message": exc.message,
                                        "operator": None}, status=exc.status)


async def on_login_needed(request: Request, exc: Exception) -> Response:
    """To the login form, which comes back here once signed in."""
    assert isinstance(exc, LoginNeeded)
    response = RedirectResponse(f"/dashboard/login?{_next_query(exc.next_path)}",
                                status_code=303)
    secure(response)
    return response


def _next_query(path: str) -> str:
    return urlencode({"next": safe_next(path)})


def install(app: Any) -> None:
    """Register the dashboard's error pages on ``app``."""
    app.add_exception_handler(PageError, on_page_error)
    app.add_exception_handler(LoginNeeded, on_login_needed)


__all__ = ["LoginNeeded", "PageError", "api_state", "check_csrf", "form", "install",
           "operator", "safe_next", "user_claims"]
