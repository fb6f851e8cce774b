"""The catalog: plans, features and model prices (``service``), and pricing."""
