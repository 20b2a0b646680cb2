"""Tools that study the engine's plans: recall (``metrics``), planted inputs (``synthetic``),
figures (``plotting``) and per-layer threshold calibration (``calibration``)."""
