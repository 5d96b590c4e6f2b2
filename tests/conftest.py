"""Shared pytest set-up: fixtures live in one module per concern, registered here."""

pytest_plugins = ["fixtures_gcs"]
