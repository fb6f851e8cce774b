"""The two-phase token process: the rules (``service``), the API's pipelined start pool
(``pool``), holds (``models``) and hold expiry (``tasks``)."""
