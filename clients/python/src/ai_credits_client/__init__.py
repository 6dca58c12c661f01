"""Python client for the AI credits service."""
