"""The serving engine and its HTTP layer: 1-4-step generation with teacher fallback."""
