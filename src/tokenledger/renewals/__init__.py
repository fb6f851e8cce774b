"""Daily resets and monthly renewals as batch runs (``service``, ``runs``), wallet expiry
(``expiry``), the failure-rate alert (``alerts``) and their tasks."""
