"""Framework integrations on the public API: Lightning's strategy and accelerate's helper (optional extras)."""
