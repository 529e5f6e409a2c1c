"""The HTTP service: ``create_app()`` builds it (``uvicorn squadbus.service:create_app --factory``)."""

from squadbus.service.app import create_app
from squadbus.service.state import ServiceOptions

__all__ = ["ServiceOptions", "create_app"]
