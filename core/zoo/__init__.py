"""Scripts that build the embedded model zoo in assets/models/ (one command each, seeded)."""
