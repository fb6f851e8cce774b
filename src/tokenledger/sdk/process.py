"""``LedgerClient.token_process``: start → your code → end, as a context manager or decorator.

    with client.token_process("u1", "text_generation", max_output_tokens=800) as usage:
        reply = llm(prompt)
        usage.report(input_tokens=reply.prompt_tokens, output_tokens=reply.output_tokens,
                     model="gemini-pro")

    @client.token_process(lambda data: data["user_id"], "text_generation")
    def generate(data):            # the seed's withTokenProcess
        ...
        return {"text": text, "input_token": 100, "output_token": 400, "model": "gemini-pro"}

Not accessible → FeatureNotAccessible (carrying the StartResult), and your code does not
run. If your code raises, the hold is released (an end with 0 tokens: nothing charged)
and the exception propagates. If it returns without reporting any usage (the provider
reported none), the end says so and the feature's catalog rule ``on_incomplete`` settles
it: ``charge_hold`` (the default) charges what was held, ``release`` nothing; either way
the outcome is marked ``incomplete``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from tokenledger.errors import FeatureNotAccessible

if TYPE_CHECKING:
    from tokenledger.results import EventResult, StartResult
    from tokenledger.sdk.client import LedgerClient

log = logging.getLogger("tokenledger.sdk")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class TokenUsage:
    """What your code used; set the fields or call ``report``. Read ``start`` for the hold."""

    start: StartResult
    input_tokens: int = 0
    output_tokens: int = 0
    model: str | None = None
    metadata: dict[str, Any] | None = None
    end_key: str | None = None
    reported: bool = False
    end_error: BaseException | None = field(default=None, repr=False)
    _client: LedgerClient | None = field(default=None, repr=False)

    @property
    def hold_id(self) -> int | None:
        return self.start.hold_id

    def report(self, input_tokens: int = 0, output_tokens: int = 0,
               model: str | None = None) -> None:
        """Record the usage the end will be priced from (adds to what was reported)."""
        self.reported = True
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        if model is not None:
            self.model = model

    def report_from(self, result: Any) -> None:
        """Take the usage from a return value shaped like the seed's (a mapping or object
        with ``input_token(s)``, ``output_token(s)`` and optionally ``model``)."""
        def pick(*names: str) -> Any:
            for name in names:
                value = (result.get(name) if isinstance(result, Mapping)
                         else getattr(result, name, None))
                if value is not None:
                    return value
            return None

        used_in = pick("input_tokens", "input_token")
        used_out = pick("output_tokens", "output_token")
        # No counts at all is "the provider reported no usage" (the on_incomplete rule),
        # not a usage of zero.
        if used_in is not None or used_out is not None:
            self.report(int(used_in or 0), int(used_out or 0))
        model = pick("model")
        if model is not None:
            self.model = model

    def outcome(self, timeout: float = 30) -> EventResult:
        """Wait for the worker's outcome of the end (``cost``, ``token``, ``status``)."""
        if self.end_key is None or self._client is None:
            raise RuntimeError("the token process has not ended yet")
        return self._client.result(self.end_key, timeout=timeout)


class TokenProcess:
    """One token process per ``with`` block, or one per call of a decorated function."""

    def __init__(self, client: LedgerClient, user_id: str | Callable[..., str],
                 feature_endpoint_id: str, *, max_output_tokens: int | None = None,
                 hold: int | None = None, model: str | None = None,
                 raise_on_end_error: bool = False) -> None:
        self.client = client
        self.user_id = user_id
        self.feature_endpoint_id = feature_endpoint_id
        self.max_output_tokens = max_output_tokens
        self.hold = hold
        self.model = model
        self.raise_on_end_error = raise_on_end_error
        self._usage: TokenUsage | None = None

    def _begin(self, user_id: str) -> TokenUsage:
        result = self.client.token_process_start(
            user_id, self.feature_endpoint_id, max_output_tokens=self.max_output_tokens,
            hold=self.hold, model=self.model)
        if not result.accessible:
            raise FeatureNotAccessible(result)
        return TokenUsage(result, model=self.model, _client=self.client)

    def _finish(self, usage: TokenUsage, failed: bool) -> None:
        start = usage.start
        assert start.user_id is not None
        used_in, used_out = (0, 0) if failed else (usage.input_tokens, usage.output_tokens)
        reported = failed or usage.reported or bool(used_in or used_out)
        try:
            usage.end_key = self.client.token_process_end(
                start.user_id, self.feature_endpoint_id, used_in, used_out,
                model=usage.model, hold_id=start.hold_id, metadata=usage.metadata,
                usage_reported=reported)
        except Exception as exc:
            # As the seed says: the user already got the service, so a failed end is
            # logged, not raised; the hold expires and gives its credits back.
            usage.end_error = exc
            log.exception("token_process_end for hold %s failed", start.hold_id)
            if self.raise_on_end_error and not failed:
                raise

    def __enter__(self) -> TokenUsage:
        if not isinstance(self.user_id, str):
            raise TypeError("a callable user_id needs the decorator form")
        self._usage = self._begin(self.user_id)
        return self._usage

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        usage, self._usage = self._usage, None
        if usage is not None:
            self._finish(usage, failed=exc_type is not None)

    async def __aenter__(self) -> TokenUsage:
        """``async with``: the start runs in a worker thread."""
        if not isinstance(self.user_id, str):
            raise TypeError("a callable user_id needs the decorator form")
        self._usage = await asyncio.to_thread(self._begin, self.user_id)
        return self._usage

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        usage, self._usage = self._usage, None
        if usage is not None:
            # Shielded: a second cancellation must not leave the process unsettled.
            await asyncio.shield(asyncio.ensure_future(asyncio.to_thread(
                self._finish, usage, exc_type is not None)))

    def __call__(self, fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            user_id = self.user_id(*args, **kwargs) if callable(self.user_id) else self.user_id
            usage = self._begin(user_id)
            try:
                result = fn(*args, **kwargs)
            except BaseException:
                self._finish(usage, failed=True)
                raise
            usage.report_from(result)
            self._finish(usage, failed=False)
            return result

        return wrapper  # type: ignore[return-value]
