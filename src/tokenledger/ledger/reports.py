"""Read-side queries: balances, history, statistics, monthly reports and ``can_afford``.

Everything here reads in the caller's session and never writes. Amounts are whole
credits; ``net_change`` over a period is the exact sum of the ledger entries in it, so
``closing_balance = opening_balance + net_change`` for any period.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import (
    ARRAY,
    Numeric,
    String,
    and_,
    case,
    cast,
    distinct,
    func,
    literal,
    or_,
    select,
    true,
)
from sqlalchemy.orm import Session

from tokenledger.catalog.service import Catalog, current_catalog
from tokenledger.db.base import Timestamp
from tokenledger.db.sql import statement
from tokenledger.errors import AccountNotFound, ValidationFailed
from tokenledger.ledger.models import ENTRY_TYPES, Account, LedgerEntry, Wallet
from tokenledger.results import Balance, balance_at_of, balance_of
from tokenledger.timeutil import as_utc

PROJECT_CREATION = "project_creation"
GRANT_TYPES = ("CREDIT", "OPEN", "RENEWAL", "DAILY_RESET", "ADJUSTMENT")
HOLD_TYPES = ("HOLD", "HOLD_RELEASE")


def account_id(session: Session, user_id: str) -> int:
    found = session.scalar(select(Account.id).where(Account.user_id == user_id))
    if found is None:
        raise AccountNotFound(user_id)
    return found


def get_account(session: Session, user_id: str) -> Account:
    """The account row for ``user_id``; raises AccountNotFound."""
    account = session.scalar(select(Account).where(Account.user_id == user_id))
    if account is None:
        raise AccountNotFound(user_id)
    return account


def account_row(account: Account) -> dict[str, Any]:
    """An account as ``accounts list`` and ``accounts show`` print it (JSON-ready)."""
    def iso(value: datetime | None) -> str | None:
        return as_utc(value).isoformat() if value is not None else None

    return {"user_id": account.user_id, "plan": account.plan_code,
            "timezone": account.timezone, "created_at": iso(account.created_at),
            "last_renewal_at": iso(account.last_renewal_at),
            "closed_at": iso(account.closed_at)}


def list_accounts(session: Session, *, plan: str | None = None, after: str | None = None,
                  limit: int = 50) -> list[dict[str, Any]]:
    """Accounts in user id order (keyset after ``after``), optionally of one plan."""
    query = select(Account)
    if plan is not None:
        query = query.where(Account.plan_code == plan)
    if after is not None:
        query = query.where(Account.user_id > after)
    return [account_row(a) for a in session.scalars(query.order_by(Account.user_id)
                                                      .limit(limit))]


def describe_entry(type_: str, feature: str | None, reference: str | None,
                   metadata: dict[str, Any] | None) -> str:
    """A human line for an entry, as the seeds' ``description`` field."""
    meta = metadata if isinstance(metadata, dict) else {}
    if type_ == "CHARGE":
        what = feature or "explicit amount"
        model = meta.get("model")
        return f"Charge for {what}" + (f" ({model})" if isinstance(model, str) else "")
    if type_ == "REFUND":
        reason = meta.get("reason")
        return f"Refund of {reference}" + (f": {reason}" if isinstance(reason, str) else "")
    if type_ == "CREDIT":
        reason = meta.get("reason")
        return "Credit" + (f": {reason}" if isinstance(reason, str) else "")
    if type_ == "OPEN":
        plan = meta.get("plan")
        return "Opening tokens" + (f" ({plan} plan)" if isinstance(plan, str) else "")
    return {
        "DAILY_RESET": "Daily reset",
        "RENEWAL": "Plan renewal",
        "EXPIRY": "Wallet expired",
        "HOLD": "Hold for " + (feature or "a token process"),
        "HOLD_RELEASE": "Hold released",
        "ADJUSTMENT": "Adjustment",
    }.get(type_, type_.title())


def entry_type(value: str) -> str:
    """An entry type as stored (``charge`` is CHARGE); ValidationFailed naming the known
    ones otherwise, so a typo never reads as an empty history."""
    upper = value.strip().upper()
    if upper not in ENTRY_TYPES:
        raise ValidationFailed(f"type: unknown entry type {value!r} (one of "
                               f"{', '.join(ENTRY_TYPES)})")
    return upper


def history(session: Session, user_id: str, *, limit: int = 50, offset: int = 0,
            type_: str | None = None, feature: str | None = None,
            start: datetime | None = None, end: datetime | None = None,
            before: int | None = None, after: int | None = None) -> list[dict[str, Any]]:
    """The account's ledger entries, newest first, filtered and paginated: by ``offset``,
    or by keyset (entries older than id ``before`` / newer than id ``after``), which reads
    only the page through the account's entry index however deep it is."""
    query = (select(LedgerEntry, Wallet.wallet_type)
             .join(Wallet, Wallet.id == LedgerEntry.wallet_id)
             .where(LedgerEntry.account_id == account_id(session, user_id)))
    if type_:
        query = query.where(LedgerEntry.type == entry_type(type_))
    if feature:
        query = query.where(LedgerEntry.feature == feature)
    if start:
        query = query.where(LedgerEntry.created_at >= start)
    if end:
        query = query.where(LedgerEntry.created_at < end)
    if before is not None:
        query = query.where(LedgerEntry.id < before)
    if after is not None:
        # The page just newer than ``after``: read upwards, then newest first.
        query = query.where(LedgerEntry.id > after).order_by(LedgerEntry.id.asc())
        rows = list(session.execute(query.limit(limit).offset(offset)))[::-1]
    else:
        rows = list(session.execute(query.order_by(LedgerEntry.id.desc())
                                    .limit(limit).offset(offset)))
    return [{
        "id": e.id, "user_id": user_id, "wallet_id": e.wallet_id, "wallet_type": wallet_type,
        "amount": e.amount, "balance_before": e.balance_before, "balance_after": e.balance_after,
        "type": e.type, "feature": e.feature, "event_key": e.event_key,
        "reference": e.reference, "metadata": e.metadata_,
        "description": describe_entry(e.type, e.feature, e.reference, e.metadata_),
        "created_at": as_utc(e.created_at).isoformat(),
    } for e, wallet_type in rows]


# -- balances ------------------------------------------------------------------------------


def balance(session: Session, user_id: str, now: datetime) -> Balance:
    """The account's plan, total over live wallets and each wallet (``sql/balance.sql``,
    the same read the SDK runs); raises AccountNotFound."""
    rows = session.execute(statement("tokenledger.ledger", "balance"),
                           {"user_id": user_id, "now": now}).all()
    return balance_of(user_id, [tuple(r) for r in rows])


def feature_cost(catalog: Catalog, feature: str) -> int | None:
    """What starting ``feature`` needs: its fixed cost, or a usage feature's minimum."""
    spec = catalog.features.get(feature)
    if spec is None:
        return None
    return spec.min_cost if spec.pricing == "usage" else spec.cost


def balance_summary(session: Session, user_id: str, catalog: Catalog,
                    now: datetime) -> dict[str, Any]:
    """Total over live wallets, each wallet, and whether a project can be created."""
    b = balance(session, user_id, now)
    available = sum(max(w.balance, 0) for w in b.wallets if w.is_active)
    required = feature_cost(catalog, PROJECT_CREATION) or 0
    can_create = (catalog.plan_includes(b.plan, PROJECT_CREATION)
                  and PROJECT_CREATION in catalog.features and available >= required)
    return {"user_id": user_id, "plan": b.plan, "timezone": b.timezone,
            "balance": b.balance, "available": available, "can_create_project": can_create,
            "required_tokens": required, "wallets": b.wallets}


def can_afford(session: Session, user_id: str, feature: str, catalog: Catalog,
               now: datetime) -> dict[str, Any]:
    """Whether the account may use ``feature`` now: cost, balance and the deficit if not."""
    return _afford(balance(session, user_id, now), feature, catalog)


def affordability(session: Session, user_id: str, catalog: Catalog,
                  now: datetime) -> list[dict[str, Any]]:
    """:func:`can_afford` for each feature the account's plan includes (one balance read),
    in feature order: the seed's "ready / not ready" per feature."""
    b = balance(session, user_id, now)
    return [_afford(b, feature, catalog) for feature in sorted(catalog.features)
            if catalog.plan_includes(b.plan, feature)]


def _afford(b: Balance, feature: str, catalog: Catalog) -> dict[str, Any]:
    cost = feature_cost(catalog, feature)
    if cost is None:
        raise ValidationFailed(f"feature: unknown feature {feature!r}")
    available = sum(max(w.balance, 0) for w in b.wallets if w.is_active)
    included = catalog.plan_includes(b.plan, feature)
    deficit = max(0, cost - available)
    reason = None
    if not included:
        reason = "Feature endpoint is not available in your package"
    elif deficit:
        reason = f"Insufficient tokens (required {cost}, available {available})"
    return {"user_id": b.user_id, "feature": feature, "cost": cost, "balance": b.balance,
            "available": available, "can_afford": included and deficit == 0,
            "deficit": deficit, "reason": reason}


# -- statistics ----------------------------------------------------------------------------


def _decimal(value: Any) -> Decimal | None:
    """A number from entry metadata; producers write metadata, so anything may be there."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    return number if number.is_finite() else None


def _int(value: Any) -> int:
    number = _decimal(value)
    if number is None or number < 0 or number > 10**15:
        return 0
    return int(number)


def _period(query: Any, start: datetime | None, end: datetime | None) -> Any:
    if start is not None:
        query = query.where(LedgerEntry.created_at >= start)
    if end is not None:
        query = query.where(LedgerEntry.created_at < end)
    return query


def statistics(session: Session, user_id: str, start: datetime | None = None,
               end: datetime | None = None, *, catalog: Catalog | None = None,
               credit_value: Decimal | None = None) -> dict[str, Any]:
    """Totals for ``[start, end)``: spent, refunded, earned, net change, per feature/model.

    ``net_change`` is the sum of every entry in the period (holds included), so it equals
    the change of the account's ledger balance. ``total_spent`` counts CHARGE entries;
    ``net_spent`` subtracts refunds. The per-model block and the margin read what
    token-process settlement records in each CHARGE entry's metadata (model, token counts,
    ``exact_cost`` in credits, ``provider_cost`` in the catalog's currency). With
    ``credit_value`` (currency per credit) the margin is also given in that currency.
    """
    if start is not None and end is not None and end <= start:
        raise ValidationFailed("end: must be after start")
    aid = account_id(session, user_id)
    e = LedgerEntry
    mine = e.account_id == aid

    op_key = func.coalesce(e.event_key, literal("#") + cast(e.id, String))

    by_type: dict[str, dict[str, int]] = {}
    for row in session.execute(_period(
        select(e.type, func.sum(e.amount).label("net"),
               func.sum(case((e.amount > 0, e.amount), else_=0)).label("plus"),
               func.sum(case((e.amount < 0, -e.amount), else_=0)).label("minus"))
        .where(mine).group_by(e.type), start, end)):
        by_type[row.type] = {"net": int(row.net or 0), "plus": int(row.plus or 0),
                             "minus": int(row.minus or 0)}

    def total(types: tuple[str, ...], part: str) -> int:
        return sum(by_type.get(t, {}).get(part, 0) for t in types)

    operations = session.scalar(_period(
        select(func.count(distinct(op_key))).where(mine, e.type.not_in(HOLD_TYPES)),
        start, end)) or 0

    features: dict[str, dict[str, int]] = defaultdict(
        lambda: {"operations": 0, "spent": 0, "refunded": 0})
    for row in session.execute(_period(
        select(e.feature, func.count(distinct(op_key)).label("ops"),
               func.sum(-e.amount).label("spent"))
        .where(mine, e.type == "CHARGE").group_by(e.feature), start, end)):
        item = features[row.feature or "(amount)"]
        item["operations"] += int(row.ops)
        item["spent"] += int(row.spent or 0)
    # Refunds in the period, by the feature of the charge each one names (read through the
    # event-key index: only the charges those refunds name).
    refunds = _period(select(e.reference).where(mine, e.type == "REFUND"), start, end)
    charges = (select(e.event_key, func.max(e.feature).label("feature"))
               .where(mine, e.type == "CHARGE", e.event_key.in_(refunds))
               .group_by(e.event_key).subquery())
    for row in session.execute(_period(
        select(charges.c.feature, func.sum(e.amount).label("refunded"))
        .join(charges, charges.c.event_key == e.reference)
        .where(mine, e.type == "REFUND").group_by(charges.c.feature), start, end)):
        features[row.feature or "(amount)"]["refunded"] += int(row.refunded or 0)
    for item in features.values():
        item["net_spent"] = item["spent"] - item["refunded"]

    models = _by_model(session, mine, start, end, catalog or current_catalog(session))
    spent = total(("CHARGE",), "minus")
    refunded = total(("REFUND",), "plus")
    return {
        "user_id": user_id,
        "start": start.isoformat() if start else None,
        "end": end.isoformat() if end else None,
        "total_spent": spent,
        "total_refunded": refunded,
        "net_spent": spent - refunded,
        "total_earned": total(GRANT_TYPES, "plus"),
        "total_removed": total(GRANT_TYPES + ("EXPIRY",), "minus"),
        "net_change": sum(t["net"] for t in by_type.values()),
        "operation_count": int(operations),
        "average_per_operation": round(spent / operations, 4) if operations else 0,
        "by_type": {t: v["net"] for t, v in sorted(by_type.items())},
        "by_feature": dict(sorted(features.items())),
        "by_model": {m: _model_out(v) for m, v in sorted(models.items())},
        "margin": _margin(models, credit_value),
    }


# The usage values of an event that the server may sum itself: all four plain decimals
# (or absent, written ``n``; a value reading ``n`` is nothing to ``_decimal`` either), which
# PostgreSQL's numeric and Python's Decimal read alike. Any other event is parsed in Python.
_USAGE_FIELDS = ("input_tokens", "output_tokens", "provider_cost", "exact_cost")
_PLAIN = r"(n|-?[0-9]+(\.[0-9]+)?)"
_PLAIN_USAGE = rf"^{_PLAIN}\|{_PLAIN}\|{_PLAIN}\|{_PLAIN}$"


def _new_model_item() -> dict[str, Any]:
    return {"operations": 0, "input_tokens": 0, "output_tokens": 0, "credits_charged": 0,
            "exact_cost": Decimal(0), "provider_cost": Decimal(0), "priced": 0,
            "exact_credits": Decimal(0), "base_credits": Decimal(0)}


def _markup(catalog: Catalog, model: str) -> Decimal:
    """``1 + profit%`` of ``model`` in the current catalog (1 for an unknown model)."""
    spec = catalog.models.get(model)
    return 1 + (Decimal(spec.profit_percent) / 100 if spec is not None else Decimal(0))


def _model_usage(session: Session, where: Any, start: datetime | None, end: datetime | None,
                 bounds: list[datetime] | None = None) -> dict[tuple[str, int], dict[str, Any]]:
    """Usage per (model, bucket) of the charge events matching ``where``; the bucket is the
    event's place among ``bounds`` (1 without them). ``base_credits`` still lacks the
    exact costs' share (``exact_credits``), which :func:`_priced` divides by the markup.

    One row per charge event (a charge spanning wallets has one entry per wallet, all with
    the same metadata). Metadata is producer-written: the server sums the events whose
    values are all plain numbers, and the rest come back one by one to be parsed here, so
    a hostile value never fails the report nor is read differently.
    """
    e = LedgerEntry
    meta = e.metadata_
    events = _period(
        select(e.event_key, func.max(meta["model"].as_string()).label("model"),
               *(func.max(meta[f].as_string()).label(f) for f in _USAGE_FIELDS),
               func.sum(-e.amount).label("credits"), func.min(e.created_at).label("at"))
        .where(where, e.type == "CHARGE", meta["model"].as_string().is_not(None))
        .group_by(e.event_key), start, end).cte("events").prefix_with("MATERIALIZED")
    c = events.c

    # One pattern match per event (materialized, so the planner does not repeat it).
    joined = func.concat_ws("|", *(func.coalesce(c[f], "n") for f in _USAGE_FIELDS))
    judged = select(
        c.model, c.credits, *(c[f] for f in _USAGE_FIELDS),
        (func.width_bucket(c.at, cast(bounds, ARRAY(Timestamp))) if bounds
         else literal(1)).label("bucket"),
        and_(func.length(joined) <= 400, joined.regexp_match(_PLAIN_USAGE)).label("plain"),
    ).cte("judged").prefix_with("MATERIALIZED")
    j = judged.c

    def number(field: str) -> Any:
        # NULL unless plain: a CASE, so the cast never sees another value.
        return case((and_(j.plain, j[field] != "n"), cast(j[field], Numeric)))

    parsed = select(j.model, j.credits, j.bucket, j.plain, *(j[f] for f in _USAGE_FIELDS),
                    *(number(f).label(f"{f}_n") for f in _USAGE_FIELDS)
                    ).cte("parsed").prefix_with("MATERIALIZED")
    p = parsed.c

    def tokens(field: str) -> Any:
        n = p[f"{field}_n"]
        return func.sum(case((and_(n >= 0, n <= 10**15), func.trunc(n)), else_=0))

    nothing = literal(None, Numeric)
    provider, exact = p.provider_cost_n, p.exact_cost_n
    summed = (select(literal(False).label("raw"), p.model, p.bucket,
                     func.count().label("operations"),
                     tokens("input_tokens").label("input_tokens_n"),
                     tokens("output_tokens").label("output_tokens_n"),
                     func.sum(p.credits).label("credits"),
                     func.sum(provider).filter(provider >= 0).label("provider_cost_n"),
                     func.count(provider).filter(provider >= 0).label("priced"),
                     func.sum(exact).filter(exact >= 0).label("exact_cost_n"),
                     func.sum(p.credits).filter(or_(exact.is_(None), exact < 0))
                     .label("unpriced"),
                     *(literal(None, String).label(f) for f in _USAGE_FIELDS))
              .where(p.plain).group_by(p.model, p.bucket))
    one_by_one = (select(literal(True), p.model, p.bucket, literal(1), nothing, nothing,
                         p.credits, nothing, literal(0), nothing, nothing,
                         *(p[f] for f in _USAGE_FIELDS))
                  .where(~p.plain))
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for r in session.execute(summed.union_all(one_by_one)):
        item = out.setdefault((r.model, int(r.bucket)), _new_model_item())
        item["operations"] += int(r.operations)
        credits = int(r.credits or 0)
        item["credits_charged"] += credits
        if not r.raw:
            item["input_tokens"] += int(r.input_tokens_n or 0)
            item["output_tokens"] += int(r.output_tokens_n or 0)
            item["provider_cost"] += Decimal(r.provider_cost_n or 0)
            item["priced"] += int(r.priced or 0)
            item["exact_cost"] += Decimal(r.exact_cost_n or 0)
            item["exact_credits"] += Decimal(r.exact_cost_n or 0)
            item["base_credits"] += int(r.unpriced or 0)
            continue
        item["input_tokens"] += _int(r.input_tokens)
        item["output_tokens"] += _int(r.output_tokens)
        cost = _decimal(r.provider_cost)
        if cost is not None and cost >= 0:
            item["provider_cost"] += cost
            item["priced"] += 1
        exact_cost = _decimal(r.exact_cost)
        if exact_cost is not None and exact_cost >= 0:
            item["exact_cost"] += exact_cost
            item["exact_credits"] += exact_cost
        else:
            item["base_credits"] += credits
    return out


def _priced(items: dict[tuple[str, int], dict[str, Any]], catalog: Catalog) -> None:
    """Add each item's exact costs before the profit markup (the current catalog's percent)
    to its ``base_credits``: what the usage cost before the markup."""
    for (model, _), item in items.items():
        item["base_credits"] += item.pop("exact_credits") / _markup(catalog, model)


def _merge(items: list[dict[str, Any]]) -> dict[str, Any]:
    total = _new_model_item()
    del total["exact_credits"]
    for item in items:
        for k in total:
            total[k] += item[k]
    return total


def _by_model(session: Session, mine: Any, start: datetime | None, end: datetime | None,
              catalog: Catalog) -> dict[str, dict[str, Any]]:
    items = _model_usage(session, mine, start, end)
    _priced(items, catalog)
    return {model: item for (model, _), item in items.items()}


def _model_out(item: dict[str, Any]) -> dict[str, Any]:
    base = item["base_credits"]
    return {"operations": item["operations"], "input_tokens": item["input_tokens"],
            "output_tokens": item["output_tokens"],
            "credits_charged": item["credits_charged"],
            "exact_cost": _round(item["exact_cost"]),
            "base_credits": _round(base),
            "margin_credits": _round(item["credits_charged"] - base),
            "provider_cost": _round(item["provider_cost"], 8),
            "priced": item["priced"]}


def _round(value: Decimal | int, places: int = 4) -> float:
    return float(round(Decimal(value), places))


def _margin(models: dict[str, dict[str, Any]],
            credit_value: Decimal | None) -> dict[str, Any]:
    """Credits charged for usage against what it cost: before markup (credits) and at the
    provider (currency); in currency too when a credit's value is given."""
    charged = sum(m["credits_charged"] for m in models.values())
    base = sum((m["base_credits"] for m in models.values()), Decimal(0))
    provider = sum((m["provider_cost"] for m in models.values()), Decimal(0))
    margin = charged - base
    out: dict[str, Any] = {
        "credits_charged": charged,
        "base_credits": _round(base),
        "margin_credits": _round(margin),
        "margin_percent": _round(100 * margin / charged, 2) if charged else 0.0,
        "provider_cost": _round(provider, 8),
        "credit_value": None, "revenue": None, "margin_value": None,
        "margin_value_percent": None,
    }
    if credit_value is not None:
        revenue = charged * credit_value
        out.update(credit_value=float(credit_value), revenue=_round(revenue, 8),
                   margin_value=_round(revenue - provider, 8),
                   margin_value_percent=_round(100 * (revenue - provider) / revenue, 2)
                   if revenue else 0.0)
    return out


# -- usage over time -----------------------------------------------------------------------


def usage(session: Session, start: datetime, end: datetime, catalog: Catalog, *,
          tz: str = "UTC", user_id: str | None = None,
          credit_value: Decimal | None = None) -> dict[str, Any]:
    """Credits charged per feature, and per model what they cost at the provider, for each
    local day (in ``tz``) of ``[start, end)``, over every account or ``user_id``'s; with
    the period's totals per feature and model and the margin, by the same rules as
    :func:`statistics`."""
    if end <= start:
        raise ValidationFailed("end: must be after start")
    days, bounds = _local_days(start, end, tz)
    e = LedgerEntry
    where = true() if user_id is None else e.account_id == account_id(session, user_id)
    bucket = func.width_bucket(e.created_at, cast(bounds, ARRAY(Timestamp)))
    credits: dict[str, list[int]] = {}
    for row in session.execute(
        select(e.feature, bucket.label("bucket"), func.sum(-e.amount).label("credits"))
        .where(where, e.type == "CHARGE", e.created_at >= start, e.created_at < end)
        .group_by(e.feature, bucket)
    ):
        series = credits.setdefault(row.feature or "(amount)", [0] * len(days))
        series[row.bucket - 1] += int(row.credits or 0)
    items = _model_usage(session, where, start, end, bounds)
    _priced(items, catalog)
    provider: dict[str, list[float]] = {}
    per_model: dict[str, list[dict[str, Any]]] = {}
    for (model, day), item in sorted(items.items()):
        provider.setdefault(model, [0.0] * len(days))[day - 1] = _round(
            item["provider_cost"], 8)
        per_model.setdefault(model, []).append(item)
    models = {model: _merge(parts) for model, parts in per_model.items()}
    return {
        "start": start.isoformat(), "end": end.isoformat(), "timezone": tz,
        "user_id": user_id, "days": days,
        "credits_by_feature": dict(sorted(credits.items())),
        "provider_cost_by_model": provider,
        "by_feature": {f: sum(v) for f, v in sorted(credits.items())},
        "by_model": {m: _model_out(v) for m, v in sorted(models.items())},
        "margin": _margin(models, credit_value),
    }


# -- monthly report ------------------------------------------------------------------------


def month_bounds(month: str, tz: str) -> tuple[datetime, datetime]:
    """``[first day 00:00, next month's first day 00:00)`` of ``YYYY-MM`` in ``tz``, as UTC."""
    try:
        year, mon = (int(p) for p in month.split("-"))
        if not 1970 <= year <= 9998:
            raise ValueError(month)
        first = datetime(year, mon, 1)
    except ValueError:
        raise ValidationFailed("month: expected YYYY-MM (years 1970-9998)") from None
    zone = ZoneInfo(tz)
    nxt = datetime(year + (mon == 12), mon % 12 + 1, 1)
    start = datetime.combine(first.date(), time(0), tzinfo=zone)
    end = datetime.combine(nxt.date(), time(0), tzinfo=zone)
    return as_utc(start), as_utc(end)


def _local_days(start: datetime, end: datetime, tz: str) -> tuple[list[str], list[datetime]]:
    """The local dates in ``[start, end)`` in ``tz`` and the UTC instant each one begins
    (the first at ``start``)."""
    zone = ZoneInfo(tz)
    day = start.astimezone(zone).date()
    days, bounds = [], []
    while True:
        begins = start if not bounds else as_utc(datetime.combine(day, time(0), tzinfo=zone))
        assert begins is not None
        if begins >= end:
            return days, bounds
        days.append(day.isoformat())
        bounds.append(begins)
        day += timedelta(days=1)


def balance_as_of(session: Session, user_id: str, at: datetime) -> Balance:
    """The account's wallets as of ``at`` (every entry dated before it) and the holds
    open then, from the ledger (``sql/balance_at.sql``, the SDK's read too). Raises
    AccountNotFound, and ValidationFailed before the retention cut-off."""
    rows = session.execute(statement("tokenledger.ledger", "balance_at"),
                           {"user_id": user_id, "at": at}).all()
    return balance_at_of(user_id, at, [tuple(r) for r in rows])


def balance_at(session: Session, user_id: str, when: datetime) -> int:
    """The account's ledger balance (every wallet, live or not) just before ``when``."""
    return sum(w.balance for w in balance_as_of(session, user_id, when).wallets)


def monthly_report(session: Session, user_id: str, month: str | None, now: datetime, *,
                   catalog: Catalog | None = None,
                   credit_value: Decimal | None = None) -> dict[str, Any]:
    """The month's statistics in the account's timezone, with opening and closing balance
    (``closing = opening + net_change``) and per-feature and per-day breakdowns."""
    account = get_account(session, user_id)
    tz = account.timezone
    month = month or now.astimezone(ZoneInfo(tz)).strftime("%Y-%m")
    start, end = month_bounds(month, tz)
    stats = statistics(session, user_id, start, end, catalog=catalog,
                       credit_value=credit_value)
    try:
        opening = balance_at(session, user_id, start)
    except ValidationFailed as exc:  # before the retention cut-off
        raise ValidationFailed(f"month: {str(exc).removeprefix('at: ')}") from None
    closing = opening + stats["net_change"]
    days, bounds = _local_days(start, end, tz)
    e = LedgerEntry
    # Each entry's local day by its place among the days' first instants (zoneinfo's,
    # DST-safe), counted on the server.
    bucket = func.width_bucket(e.created_at, cast(bounds, ARRAY(Timestamp)))
    daily = {days[row.bucket - 1]: {"spent": int(row.spent), "refunded": int(row.refunded)}
             for row in session.execute(
                 select(bucket.label("bucket"),
                        func.sum(case((e.type == "CHARGE", -e.amount), else_=0)).label("spent"),
                        func.sum(case((e.type == "REFUND", e.amount), else_=0))
                        .label("refunded"))
                 .where(e.account_id == account.id, e.created_at >= start, e.created_at < end,
                        e.type.in_(("CHARGE", "REFUND")))
                 .group_by(bucket))}
    return {
        "user_id": user_id,
        "month": month,
        "period": {"start": start.isoformat(), "end": end.isoformat(), "timezone": tz},
        "opening_balance": opening,
        "closing_balance": closing,
        "summary": {k: stats[k] for k in (
            "total_spent", "total_refunded", "net_spent", "total_earned", "total_removed",
            "net_change", "operation_count", "average_per_operation")},
        "breakdown": stats["by_feature"],
        "by_model": stats["by_model"],
        "margin": stats["margin"],
        "daily": dict(sorted(daily.items())),
    }


__all__ = ["account_id", "affordability", "balance_as_of", "balance_at", "balance_summary",
           "can_afford", "describe_entry", "feature_cost", "get_account", "history",
           "month_bounds", "monthly_report", "statistics", "balance", "usage"]
