"""Request and response bodies of the notification routes."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class NotificationSettings(BaseModel):
    """The caller's notification choices."""

    model_config = ConfigDict(extra="forbid")

    email_notifications: bool
