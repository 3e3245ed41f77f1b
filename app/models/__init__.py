"""Every table of the studio; importing this package registers them all on ``Base.metadata``."""

from app.models.base import Base, utcnow
from app.models.image import GeneratedImage, PriorBank
from app.models.job import ACTIVE_STATUSES, JOB_STAGES, JOB_STATUSES, GenerationRequest, Job
from app.models.share import ShareLink
from app.models.subject import SUBJECT_KINDS, Photo, Subject
from app.models.user import ApiToken, DataExport, OutgoingEmail, PasswordReset, RateEvent, User, UserSession
from app.models.worker import WorkerHeartbeat

__all__ = [
    "ACTIVE_STATUSES",
    "JOB_STAGES",
    "JOB_STATUSES",
    "SUBJECT_KINDS",
    "ApiToken",
    "Base",
    "DataExport",
    "GeneratedImage",
    "GenerationRequest",
    "Job",
    "OutgoingEmail",
    "PasswordReset",
    "Photo",
    "PriorBank",
    "RateEvent",
    "ShareLink",
    "Subject",
    "User",
    "UserSession",
    "WorkerHeartbeat",
    "utcnow",
]
