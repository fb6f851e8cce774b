"""What operators change, each in two steps: a form posts here, the fields are validated
and shown for confirmation; the confirmed form (CSRF-checked again, validated again: a
hidden field proves nothing) goes through the same path as the SDK, the API or the CLI.

- open an account: ``LedgerClient.open_account`` (the API's ``POST /api/accounts``);
- credit: a ``credit`` event published to the workers, like ``POST /api/billing/wallets``,
  with the outcome awaited; its key is chosen at the first step, so a form sent twice
  credits once;
- change plan: ``ledger.plans.change_plan``;
- dry run: ``renewals.runs.start_run`` + ``dispatch``, like ``POST /api/renewals/run``;
- dead letters: re-published as they were and removed, or dropped (``tokenledger dlq``);
- conflicts: the conflicting payload published again under a new key, or dropped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import delete
from starlette.concurrency import run_in_threadpool

from tokenledger.api.deps import ApiState, wait_outcome
from tokenledger.dashboard import queries
from tokenledger.dashboard.access import PageError, api_state, check_csrf, form, operator
from tokenledger.dashboard.auth import Operator
from tokenledger.dashboard.links import MAX_TTL, mint
from tokenledger.dashboard.operators import flower_url
from tokenledger.dashboard.render import page, query, secure, start_clock
from tokenledger.db.uow import unit_of_work
from tokenledger.errors import AccountNotFound, TokenLedgerError, ValidationFailed
from tokenledger.ledger.models import EventConflict
from tokenledger.ledger.plans import change_plan
from tokenledger.ledger.reports import get_account
from tokenledger.queue.deadletters import drop, payload_of, select_ids
from tokenledger.queue.models import DeadLetter
from tokenledger.renewals import runs as runner
from tokenledger.renewals.service import RunOptions, due_count
from tokenledger.sdk.client import build_event, new_key

router = APIRouter(prefix="/dashboard/ops/actions", include_in_schema=False)


@dataclass
class Confirm:
    """The confirmation step: what will happen, and the fields to send again."""

    title: str
    lines: list[tuple[str, str]]
    fields: dict[str, str]
    warning: str | None = None


@dataclass
class Done:
    """What happened, and where to look next."""

    title: str
    message: str
    ok: bool = True
    links: list[tuple[str, str]] = field(default_factory=list)
    redirect: str | None = None
    details: list[tuple[str, str]] = field(default_factory=list)


Action = tuple[Callable[[ApiState, dict[str, str]], Confirm] | None,
               Callable[[ApiState, dict[str, str]], Done]]


def _text(fields: dict[str, str], name: str, required: bool = True) -> str:
    value = fields.get(name, "").strip()
    if required and not value:
        raise PageError(400, "Missing field", f"{name}: required")
    return value


def _int(fields: dict[str, str], name: str, low: int = 1, high: int = 2**63 - 1) -> int:
    text = _text(fields, name)
    try:
        value = int(text)
    except ValueError:
        raise PageError(400, "Bad number", f"{name}: a whole number") from None
    if not low <= value <= high:
        raise PageError(400, "Bad number", f"{name}: between {low} and {high}")
    return value


def _event(data: dict[str, Any]) -> Any:
    try:
        return build_event(data)
    except ValidationFailed as exc:
        raise PageError(400, "Cannot do that", str(exc)) from None


def _account_link(user_id: str) -> tuple[str, str]:
    return ("the account", query("/dashboard/ops/account", user_id=user_id))


def _existing(api: ApiState, user_id: str) -> Any:
    with unit_of_work(api.settings) as uow:
        try:
            return get_account(uow.session, user_id)
        except AccountNotFound:
            raise PageError(404, "No such account", f"no account {user_id!r}") from None


# -- accounts ----------------------------------------------------------------------------


def _open_event(api: ApiState, fields: dict[str, str]) -> Any:
    return _event({"type": "open_account", "key": f"open:{_text(fields, 'user_id')}",
                   "user_id": _text(fields, "user_id"),
                   **({"plan": p} if (p := _text(fields, "plan", False)) else {}),
                   **({"timezone": t} if (t := _text(fields, "timezone", False)) else {})})


def _open_preview(api: ApiState, fields: dict[str, str]) -> Confirm:
    event = _open_event(api, fields)
    with unit_of_work(api.settings) as uow:
        plans = uow.catalog.plans
        plan = event.plan or uow.catalog.default_plan
        try:
            found = get_account(uow.session, event.user_id)
        except AccountNotFound:
            found = None
    if plan not in plans:
        raise PageError(400, "Cannot do that", f"plan: unknown plan {plan!r}")
    if found is not None:
        raise PageError(409, "Account exists", f"{event.user_id!r} already has an account "
                                               f"(plan {found.plan_code})")
    return Confirm("Open this account?", [
        ("user id", event.user_id), ("plan", plan),
        ("opening tokens", str(plans[plan].opening_tokens)),
        ("timezone", event.timezone or api.settings.timezone)],
        {"user_id": event.user_id, "plan": plan, "timezone": event.timezone or ""})


def _open_perform(api: ApiState, fields: dict[str, str]) -> Done:
    event = _open_event(api, fields)
    try:
        api.client.open_account(event.user_id, plan=event.plan, timezone=event.timezone)
    except ValidationFailed as exc:
        return Done("Not opened", str(exc), ok=False)
    return Done("Account opened", f"{event.user_id} is open.",
                redirect=_account_link(event.user_id)[1])


def _credit_event(fields: dict[str, str]) -> Any:
    expires = _text(fields, "expires_at", False)
    when = None
    if expires:
        try:
            when = datetime.fromisoformat(expires)
        except ValueError:
            raise PageError(400, "Bad date", "expires_at: a date and time like "
                                             "2027-01-31T00:00") from None
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
    return _event({"type": "credit", "key": _text(fields, "key", False) or
                   f"dashboard-credit-{new_key()}", "user_id": _text(fields, "user_id"),
                   "amount": _int(fields, "amount", 1, 10**12),
                   "wallet_type": _text(fields, "wallet_type", False) or "PREMIUM",
                   **({"expires_at": when} if when else {}),
                   **({"reason": r} if (r := _text(fields, "reason", False)) else {})})


def _credit_preview(api: ApiState, fields: dict[str, str]) -> Confirm:
    event = _credit_event(fields)
    _existing(api, event.user_id)
    return Confirm(f"Credit {event.amount:,} to {event.user_id}?", [
        ("user id", event.user_id), ("amount", f"{event.amount:,} credits"),
        ("wallet", event.wallet_type),
        ("expires", event.expires_at.isoformat() if event.expires_at else "never"),
        ("reason", event.reason or "-"), ("event key", event.key)],
        {"user_id": event.user_id, "amount": str(event.amount),
         "wallet_type": event.wallet_type, "reason": event.reason or "", "key": event.key,
         "expires_at": event.expires_at.isoformat() if event.expires_at else ""})


def _credit_perform(api: ApiState, fields: dict[str, str]) -> Done:
    event = _credit_event(fields)
    _existing(api, event.user_id)
    api.client.publish(event)
    outcome = wait_outcome(api.settings, event.key, event.payload_hash(), api.end_wait)
    links = [_account_link(event.user_id),
             ("the outcome", f"/dashboard/ops/outcome?key={_quote(event.key)}")]
    if outcome.status == "pending":
        return Done("Credit sent", f"The workers have not applied {event.key} yet; its "
                                   "outcome will show on the account.", links=links)
    if outcome.status != "applied":
        return Done("Credit not applied", f"{outcome.status}: {outcome.reason or '-'}",
                    ok=False, links=links)
    return Done("Credited", f"{event.amount:,} credits added to {event.user_id}'s "
                            f"{event.wallet_type} wallet; balance now "
                            f"{outcome.result.get('balance', '?')}.", links=links)


def _quote(text: str) -> str:
    return quote(text, safe="")


def _plan_preview(api: ApiState, fields: dict[str, str]) -> Confirm:
    user_id, plan = _text(fields, "user_id"), _text(fields, "plan")
    current = _existing(api, user_id)
    with unit_of_work(api.settings) as uow:
        spec = uow.catalog.plans.get(plan)
    if spec is None:
        raise PageError(400, "Cannot do that", f"plan: unknown plan {plan!r}")
    return Confirm(f"Move {user_id} to {plan}?", [
        ("user id", user_id), ("plan now", current.plan_code), ("new plan", plan),
        ("renews", f"{spec.allocation:,} credits, {spec.period}, {spec.renewal_mode}")],
        {"user_id": user_id, "plan": plan},
        warning="No credits move now: the new plan applies from the account's next reset "
                "or renewal; its features from the next charge.")


def _plan_perform(api: ApiState, fields: dict[str, str]) -> Done:
    user_id, plan = _text(fields, "user_id"), _text(fields, "plan")
    try:
        with unit_of_work(api.settings) as uow:
            change = change_plan(uow, user_id, plan)
    except (ValidationFailed, AccountNotFound) as exc:
        return Done("Plan not changed", str(exc), ok=False, links=[_account_link(user_id)])
    message = (f"{user_id} moved from {change.previous} to {change.plan}." if change.changed
               else f"{user_id} already had plan {change.plan}.")
    return Done("Plan changed" if change.changed else "Plan unchanged", message,
                redirect=_account_link(user_id)[1])


def _link_perform(api: ApiState, fields: dict[str, str]) -> Done:
    user_id = _text(fields, "user_id")
    minutes = _int(fields, "minutes", 1, MAX_TTL // 60)
    _existing(api, user_id)
    with unit_of_work(api.settings) as uow:
        link = mint(api.settings, user_id, uow.now, minutes * 60, base_url=fields["base_url"])
    return Done("User link", f"Read-only link to {user_id}'s dashboard, valid until "
                             f"{link.expires_at.isoformat()}.",
                links=[("open it", link.url), _account_link(user_id)],
                details=[("link", link.url), ("badge snippet", link.badge_html)])


# -- runs --------------------------------------------------------------------------------


def _run_options(api: ApiState, fields: dict[str, str]) -> RunOptions:
    limit = _text(fields, "limit", False)
    try:
        return RunOptions(kind=_text(fields, "kind"), tier=_text(fields, "tier", False) or None,
                          limit=_int(fields, "limit", 1) if limit else None, dry_run=True,
                          chunk_size=api.settings.renewal_chunk_size, trigger="dashboard")
    except ValidationFailed as exc:
        raise PageError(400, "Cannot do that", str(exc)) from None


def _dry_run_preview(api: ApiState, fields: dict[str, str]) -> Confirm:
    options = _run_options(api, fields)
    with unit_of_work(api.settings) as uow:
        try:
            due = due_count(uow.session, options.kind, uow.catalog, uow.now, options.tier)
        except ValidationFailed as exc:
            raise PageError(400, "Cannot do that", str(exc)) from None
    return Confirm(f"Start a dry {options.kind} run?", [
        ("kind", options.kind), ("tier", options.tier or "every plan of the period"),
        ("limit", str(options.limit or "none")),
        ("accounts due now", f"{due:,}" + (f" (at most {options.limit:,})"
                                          if options.limit else ""))],
        {"kind": options.kind, "tier": options.tier or "",
         "limit": str(options.limit or "")},
        warning="A dry run changes no balance: it records what the run would do.")


def _dry_run_perform(api: ApiState, fields: dict[str, str]) -> Done:
    options = _run_options(api, fields)
    run_id, chunk_ids = runner.start_run(api.settings, options)
    if chunk_ids:
        runner.dispatch(api.settings, chunk_ids, producer=api.client.producer)
    return Done("Dry run started", f"Run {run_id}: {len(chunk_ids)} chunk(s) sent to the "
                                   "workers.", redirect=f"/dashboard/ops/runs/{run_id}")


# -- dead letters and conflicts ----------------------------------------------------------


def _letter(api: ApiState, fields: dict[str, str]) -> dict[str, Any]:
    letter_id = _int(fields, "id")
    with unit_of_work(api.settings) as uow:
        found = uow.session.get(DeadLetter, letter_id)
        if found is None:
            raise PageError(404, "No such dead letter", f"dead letter {letter_id} is gone "
                                                        "(retried or dropped already?)")
        return {"id": found.id, "key": found.key or "-", "reason": found.reason,
                "attempts": found.attempts}


def _retry_letter_preview(api: ApiState, fields: dict[str, str]) -> Confirm:
    letter = _letter(api, fields)
    return Confirm(f"Retry dead letter {letter['id']}?", [
        ("key", letter["key"]), ("reason", letter["reason"]),
        ("attempts", str(letter["attempts"]))], {"id": str(letter["id"])},
        warning="It is published again as it was; the workers validate it again.")


def _retry_letter_perform(api: ApiState, fields: dict[str, str]) -> Done:
    letter_id = _int(fields, "id")
    with unit_of_work(api.settings) as uow:
        letters = select_ids(uow.session, [letter_id])
        for letter in letters:
            api.client.producer.publish_events(payload_of(letter))
            uow.session.delete(letter)
    if not letters:
        return Done("Nothing retried", f"dead letter {letter_id} is gone (retried or "
                                       "dropped already?)", ok=False,
                    links=[("dead letters", "/dashboard/ops/dead-letters")])
    return Done("Retried", f"Dead letter {letter_id} published again.",
                redirect="/dashboard/ops/dead-letters")


def _drop_letter_preview(api: ApiState, fields: dict[str, str]) -> Confirm:
    letter = _letter(api, fields)
    return Confirm(f"Drop dead letter {letter['id']} for good?", [
        ("key", letter["key"]), ("reason", letter["reason"])], {"id": str(letter["id"])},
        warning="Dropped messages are deleted; nothing applies them.")


def _drop_letter_perform(api: ApiState, fields: dict[str, str]) -> Done:
    letter_id = _int(fields, "id")
    with unit_of_work(api.settings) as uow:
        count = drop(uow.session, [letter_id])
    return Done("Dropped" if count else "Nothing dropped",
                f"Dead letter {letter_id} deleted." if count else
                f"dead letter {letter_id} is gone already", ok=bool(count),
                redirect="/dashboard/ops/dead-letters" if count else None,
                links=[("dead letters", "/dashboard/ops/dead-letters")])


def retry_key(key: str, conflict_id: int) -> str:
    """The new key a conflicting payload is published under: derived from the conflict,
    so retrying the same conflict twice applies it once."""
    candidate = f"{key}#conflict-{conflict_id}"
    if len(candidate) <= 255:
        return candidate
    return f"conflict-{conflict_id}-{hashlib.sha256(key.encode()).hexdigest()}"


def _conflict(api: ApiState, fields: dict[str, str]) -> dict[str, Any]:
    conflict_id = _int(fields, "id")
    with unit_of_work(api.settings) as uow:
        found = queries.conflict(uow.session, conflict_id)
    if found is None:
        raise PageError(404, "No such conflict", f"conflict {conflict_id} is gone")
    return found


def _retry_conflict_preview(api: ApiState, fields: dict[str, str]) -> Confirm:
    found = _conflict(api, fields)
    new = retry_key(found["key"], found["id"])
    _event({**found["payload"], "key": new})
    return Confirm(f"Apply conflict {found['id']} under a new key?", [
        ("key", found["key"]), ("new key", new),
        ("payload", json.dumps(found["payload"], sort_keys=True))], {"id": str(found["id"])},
        warning="The payload was never applied: its key had been used for another one. "
                "It is published under the new key, and the conflict removed.")


def _retry_conflict_perform(api: ApiState, fields: dict[str, str]) -> Done:
    found = _conflict(api, fields)
    event = _event({**found["payload"], "key": retry_key(found["key"], found["id"])})
    api.client.publish(event)
    with unit_of_work(api.settings) as uow:
        uow.session.execute(delete(EventConflict).where(EventConflict.id == found["id"]))
    return Done("Published", f"Conflict {found['id']} published as {event.key}.",
                links=[("the outcome", f"/dashboard/ops/outcome?key={_quote(event.key)}"),
                       ("conflicts", "/dashboard/ops/conflicts")])


def _drop_conflict_preview(api: ApiState, fields: dict[str, str]) -> Confirm:
    found = _conflict(api, fields)
    return Confirm(f"Drop conflict {found['id']}?", [("key", found["key"])],
                   {"id": str(found["id"])},
                   warning="Only the record goes: the payload was never applied.")


def _drop_conflict_perform(api: ApiState, fields: dict[str, str]) -> Done:
    found = _conflict(api, fields)
    with unit_of_work(api.settings) as uow:
        uow.session.execute(delete(EventConflict).where(EventConflict.id == found["id"]))
    return Done("Dropped", f"Conflict {found['id']} removed.",
                redirect="/dashboard/ops/conflicts")


ACTIONS: dict[str, Action] = {
    "open-account": (_open_preview, _open_perform),
    "credit": (_credit_preview, _credit_perform),
    "change-plan": (_plan_preview, _plan_perform),
    "user-link": (None, _link_perform),
    "dry-run": (_dry_run_preview, _dry_run_perform),
    "retry-dead-letter": (_retry_letter_preview, _retry_letter_perform),
    "drop-dead-letter": (_drop_letter_preview, _drop_letter_perform),
    "retry-conflict": (_retry_conflict_preview, _retry_conflict_perform),
    "drop-conflict": (_drop_conflict_preview, _drop_conflict_perform),
}


def _back(name: str, fields: dict[str, str]) -> str:
    """Where Cancel leads: the page the action's form is on."""
    if name in ("credit", "change-plan", "user-link") and fields.get("user_id"):
        return _account_link(fields["user_id"])[1]
    return {"dry-run": "/dashboard/ops/runs", "retry-dead-letter": "/dashboard/ops/dead-letters",
            "drop-dead-letter": "/dashboard/ops/dead-letters",
            "retry-conflict": "/dashboard/ops/conflicts",
            "drop-conflict": "/dashboard/ops/conflicts"}.get(name, "/dashboard/ops/accounts")


@router.post("/{name}")
async def act(request: Request, name: str) -> Response:
    """Step one (no ``confirm``): validate and show what will happen. Step two
    (``confirm=yes``): validate again and do it."""
    await start_clock(request)
    fields = await form(request)
    who: Operator = await run_in_threadpool(operator, request)
    check_csrf(who, fields)
    action = ACTIONS.get(name)
    if action is None:
        raise PageError(404, "No such action", f"unknown action {name!r}")
    preview, perform = action
    api = api_state(request)
    # Links start with the URL this page was served at (never a URL from the form).
    fields["base_url"] = api.settings.dashboard_url or str(request.base_url)
    context = {"operator": who, "nav": "", "flower_url": flower_url(request)}
    if preview is not None and fields.get("confirm") != "yes":
        confirm = await run_in_threadpool(preview, api, fields)
        return page(request, "ops/confirm.html", {**context, "confirm": confirm,
                                                  "action": name, "back": _back(name, fields)})
    try:
        done = await run_in_threadpool(perform, api, fields)
    except TokenLedgerError as exc:
        done = Done("Failed", str(exc), ok=False)
    if done.redirect and done.ok:
        # The page shows a fixed notice for the action (never text from the URL).
        response = RedirectResponse(done.redirect + ("&" if "?" in done.redirect else "?")
                                    + f"done={name}", status_code=303)
        secure(response)
        return response
    return page(request, "ops/done.html", {**context, "done": done},
                status=200 if done.ok else 409)
