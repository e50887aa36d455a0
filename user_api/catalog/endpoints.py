"""Routes of the application catalog."""

from __future__ import annotations

from fastapi import APIRouter

from user_api.catalog.schemas import PublicCatalog
from user_api.dependencies import CatalogStoreDep, CurrentUser

router = APIRouter(tags=["jobs"])


@router.get(
    "/jobs/applications",
    response_model=PublicCatalog,
    summary="List the applications, versions and entrypoints a job can run",
)
async def list_applications(_user: CurrentUser, store: CatalogStoreDep) -> PublicCatalog:
    """Application -> version -> entrypoint, each with the environment variables,
    inputs and outputs it accepts and the hardware and time it is given."""
    return store.current.public_view()
