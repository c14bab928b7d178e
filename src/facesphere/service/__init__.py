"""``facesphere serve``: the face pipeline and a gallery behind a REST API and a web page (FastAPI)."""

from facesphere.service.app import ERROR_STATUS, FaceService, build_app, create_app
from facesphere.service.settings import ServiceSettings, read_api_keys

__all__ = ["ERROR_STATUS", "FaceService", "ServiceSettings", "build_app", "create_app", "read_api_keys"]
