"""The streaming form of ``token_process``: a hold that grows with the stream, a stop at
the balance, and exactly one settlement with the real usage.

    with client.token_process(user, "text_generation", stream=True,
                              input_tokens=prompt_tokens, step=2000) as proc:
        for chunk in model.stream(prompt):
            proc.add_output(chunk.tokens)     # raises BalanceReached past the balance
            send(chunk.text)
    proc.outcome()                            # cost, token, status

    async with client.token_process(user, "text_generation", stream=True) as proc:
        async for chunk in model.astream(prompt):
            await proc.add_output(chunk.tokens)
            await send(chunk.text)

How it goes:

- the start holds ``step`` output tokens' worth; whenever fewer than ``step // 2``
  covered tokens are left, the hold is extended (``LedgerClient.extend``, under the
  account lock) to cover ``step`` more. Each extend also pushes the hold's expiry one TTL
  on, so a live stream never loses its hold.
- when an extend answers ``limit_reached`` the hold takes what is left, and from then on
  a chunk that would pass what the hold covers is refused: ``add_output`` raises
  :class:`~tokenledger.errors.BalanceReached` (or, with ``raise_on_limit=False``, returns
  False and sets ``should_stop``). That chunk is not counted: don't deliver it. Leaving
  the block with BalanceReached is a normal stop (the block swallows it).
- leaving the block settles once, by one ``token_process_end`` with the usage counted
  (its key is made at the start, so the end is one event however it is reached): after
  the stream ended, after BalanceReached, and also after an exception, a cancelled task
  or Ctrl-C — the tokens counted were delivered, so they are charged; the exception then
  propagates. A stream that counted nothing releases the hold. A producer that dies
  mid-stream never settles: its hold stops being extended and the expiry sweep releases
  it one TTL after the last extend.
- ``report(input_tokens=..., output_tokens=...)`` replaces the counts with the
  provider's final usage when it gives one.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from tokenledger.errors import BalanceReached, FeatureNotAccessible

if TYPE_CHECKING:
    from tokenledger.results import EventResult, ExtendResult, StartResult
    from tokenledger.sdk.client import LedgerClient

log = logging.getLogger("tokenledger.sdk")
F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_STEP = 1000  # output tokens held ahead of the stream


class TokenStream:
    """One streaming token process: feed it output-token counts, read ``should_stop``."""

    def __init__(self, client: LedgerClient, user_id: str, feature_endpoint_id: str, *,
                 input_tokens: int = 0, step: int = DEFAULT_STEP, model: str | None = None,
                 raise_on_limit: bool = True, metadata: dict[str, Any] | None = None) -> None:
        if step <= 0:
            raise ValueError("step must be positive")
        self.client = client
        self.user_id = user_id
        self.feature_endpoint_id = feature_endpoint_id
        self.input_tokens = input_tokens
        self.output_tokens = 0
        self.step = step
        self.model = model
        self.raise_on_limit = raise_on_limit
        self.metadata = metadata
        self.start: StartResult | None = None
        self.held = 0
        self.covers: int | None = None  # output tokens the hold pays for; None: no limit
        self.exhausted = False  # the hold has taken all the account could give
        self.should_stop = False
        self.end_key = f"stream-end:{uuid.uuid4().hex}"
        self.end_error: BaseException | None = None
        self._settled = False
        self._lock = threading.Lock()

    @property
    def hold_id(self) -> int | None:
        return self.start.hold_id if self.start is not None else None

    # -- the stream ---------------------------------------------------------------------

    def open(self) -> TokenStream:
        """Start the process (FeatureNotAccessible when refused) and hold the first step."""
        start = self.client.token_process_start(
            self.user_id, self.feature_endpoint_id, max_output_tokens=self.step,
            model=self.model)
        if not start.accessible:
            raise FeatureNotAccessible(start)
        self.start, self.held = start, start.held
        self._grow(self.step)
        return self

    def needs_ledger(self, n: int) -> bool:
        """Whether counting ``n`` more tokens asks the ledger first (an extend)."""
        if self.covers is None or self.exhausted:
            return False
        return self.output_tokens + n > self.covers - self.step // 2

    def add_output(self, n: int) -> bool:
        """Count ``n`` output tokens just received; extend the hold ahead when it runs low.

        Returns True when counted. A chunk past what the balance covers is not counted:
        BalanceReached is raised (``raise_on_limit``), or False returned; ``should_stop``
        is set either way.
        """
        if n < 0:
            raise ValueError("token counts are never negative")
        with self._lock:
            if self.should_stop:
                return self._refuse()
            if self.needs_ledger(n):
                self._grow(self.output_tokens + n + self.step)
            if self.covers is not None and self.output_tokens + n > self.covers:
                self.should_stop = True
                return self._refuse()
            self.output_tokens += n
            if self.exhausted and self.covers is not None and self.output_tokens >= self.covers:
                self.should_stop = True
            return True

    def report(self, input_tokens: int | None = None, output_tokens: int | None = None) -> None:
        """Replace the counts with the provider's final usage (what the end charges)."""
        if input_tokens is not None:
            self.input_tokens = input_tokens
        if output_tokens is not None:
            self.output_tokens = output_tokens

    def _refuse(self) -> bool:
        if self.raise_on_limit:
            raise BalanceReached(self.held, self.output_tokens)
        return False

    def _grow(self, to_output_tokens: int) -> None:
        """Extend the hold to cover ``to_output_tokens``; at the limit, take what is left."""
        assert self.hold_id is not None
        answer = self.client.extend(self.hold_id, to_output_tokens=to_output_tokens,
                                    input_tokens=self.input_tokens)
        if answer.status == "limit_reached":
            self.exhausted = True
            if answer.available > 0:
                answer = self.client.extend(self.hold_id, answer.available,
                                            input_tokens=self.input_tokens)
        self._take(answer)

    def _take(self, answer: ExtendResult) -> None:
        if answer.status == "closed":  # expired under us: nothing more may be streamed
            self.exhausted, self.covers = True, self.output_tokens
            return
        self.held = answer.held
        self.covers = answer.covers_output_tokens

    # -- the settlement -----------------------------------------------------------------

    def settle(self) -> str | None:
        """End the process once with the usage counted (later calls do nothing); returns
        the end's key. A failed publish is logged: the hold's expiry is the backstop."""
        with self._lock:
            if self._settled or self.start is None:
                return None
            self._settled = True
        try:
            return self.client.token_process_end(
                self.user_id, self.feature_endpoint_id,
                self.input_tokens if self.output_tokens else 0, self.output_tokens,
                model=self.model, hold_id=self.hold_id, key=self.end_key,
                metadata=self.metadata)
        except Exception as exc:
            self.end_error = exc
            log.exception("token_process_end for streaming hold %s failed", self.hold_id)
            return None

    def outcome(self, timeout: float = 30) -> EventResult:
        """Wait for the worker's outcome of the end (``cost``, ``token``, ``status``)."""
        if not self._settled:
            raise RuntimeError("the token process has not ended yet")
        return self.client.result(self.end_key, timeout=timeout)


class AsyncTokenStream:
    """A :class:`TokenStream` for asyncio code: the ledger calls run in a thread, so the
    event loop never waits on them; counting a chunk that needs no extend costs no
    thread hop."""

    def __init__(self, stream: TokenStream) -> None:
        self.sync = stream

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sync, name)

    async def add_output(self, n: int) -> bool:
        """``TokenStream.add_output``, awaited."""
        if self.sync.needs_ledger(n):
            return await asyncio.to_thread(self.sync.add_output, n)
        return self.sync.add_output(n)

    async def settle(self) -> str | None:
        """Settle in a thread; shielded, so a second cancellation cannot stop it."""
        return await asyncio.shield(asyncio.ensure_future(asyncio.to_thread(self.sync.settle)))

    async def outcome(self, timeout: float = 30) -> EventResult:
        return await asyncio.to_thread(self.sync.outcome, timeout)


class StreamingProcess:
    """``token_process(..., stream=True)``: a context manager (``with`` or ``async
    with``) or a decorator whose function gets the stream as ``token_stream=``."""

    def __init__(self, client: LedgerClient, user_id: str | Callable[..., str],
                 feature_endpoint_id: str, **options: Any) -> None:
        self.client = client
        self.user_id = user_id
        self.feature_endpoint_id = feature_endpoint_id
        self.options = options
        self._current: TokenStream | None = None

    def _new(self, user_id: str) -> TokenStream:
        return TokenStream(self.client, user_id, self.feature_endpoint_id, **self.options)

    def _user(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        return self.user_id(*args, **kwargs) if callable(self.user_id) else self.user_id

    def __enter__(self) -> TokenStream:
        if not isinstance(self.user_id, str):
            raise TypeError("a callable user_id needs the decorator form")
        self._current = self._new(self.user_id).open()
        return self._current

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        stream, self._current = self._current, None
        if stream is not None:
            stream.settle()
        return exc_type is not None and issubclass(exc_type, BalanceReached)

    async def __aenter__(self) -> AsyncTokenStream:
        if not isinstance(self.user_id, str):
            raise TypeError("a callable user_id needs the decorator form")
        stream = self._new(self.user_id)
        self._current = stream
        await asyncio.to_thread(stream.open)
        return AsyncTokenStream(stream)

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        stream, self._current = self._current, None
        if stream is not None:
            await AsyncTokenStream(stream).settle()
        return exc_type is not None and issubclass(exc_type, BalanceReached)

    def __call__(self, fn: F) -> F:
        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def awrapper(*args: Any, **kwargs: Any) -> Any:
                stream = self._new(self._user(args, kwargs))
                await asyncio.to_thread(stream.open)
                proc = AsyncTokenStream(stream)
                try:
                    return await fn(*args, token_stream=proc, **kwargs)
                except BalanceReached:
                    return None
                finally:
                    await proc.settle()

            return awrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            stream = self._new(self._user(args, kwargs)).open()
            try:
                return fn(*args, token_stream=stream, **kwargs)
            except BalanceReached:
                return None
            finally:
                stream.settle()

        return wrapper  # type: ignore[return-value]
