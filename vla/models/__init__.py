"""Models: the registry (short names → open_clip / transformers / ultralytics), adapters, heads."""
