"""Balance notifications: the rule and staging (``service``), sending (``publisher``),
listening (``subscriber``)."""
