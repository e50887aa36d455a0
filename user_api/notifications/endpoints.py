"""The caller's notification settings."""

from __future__ import annotations

from fastapi import APIRouter

from user_api.dependencies import CurrentUser, SessionDep
from user_api.notifications import service
from user_api.notifications.schemas import NotificationSettings

router = APIRouter(tags=["notifications"])


@router.get("/user/notifications")
def get_notifications(user: CurrentUser, session: SessionDep) -> NotificationSettings:
    """Whether you get an email when one of your jobs ends."""
    return service.get_notification_settings(session, user=user)


@router.put("/user/notifications")
def update_notifications(
    changes: NotificationSettings, user: CurrentUser, session: SessionDep
) -> NotificationSettings:
    """Change whether you get an email when one of your jobs ends."""
    return service.update_notification_settings(session, user=user, changes=changes)
