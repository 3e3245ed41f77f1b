"""Upload sanitizing: decode with an allow-list, check, apply EXIF orientation, re-encode without metadata."""

from app.photos.sanitize import PhotoRejected, SanitizedBatch, SanitizedPhoto, sanitize_upload, sanitize_uploads

__all__ = ["PhotoRejected", "SanitizedBatch", "SanitizedPhoto", "sanitize_upload", "sanitize_uploads"]
