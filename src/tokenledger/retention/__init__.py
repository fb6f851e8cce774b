"""Data over time: erasing a person, compacting old entries into carry-forwards, archives."""
