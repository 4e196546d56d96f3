"""Drop-in adapters for trainers' advantage functions (the top layer: they import the API)."""
