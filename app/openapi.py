"""The JSON API's OpenAPI document, with what FastAPI cannot infer from the routes.

FastAPI documents each route's success answer and its request validation (422). The rest of the
contract lives in dependencies, middleware and services, so it is added here, in one place:

- how to authenticate: a bearer token, or the browser's session cookie (writes then also need the
  ``X-CSRF-Token`` header); every operation except those in :data:`PUBLIC` requires one of them;
- the errors every operation of a kind can answer: 401 without valid credentials, 404 for an id
  that is not the caller's, 413 for a body over the request limit, 403 for a cookie write without
  its CSRF token;
- the errors particular routes answer (:data:`ROUTE_ERRORS`), and the settings-dependent limits
  of the studio upload (how many photos, which base models).

``tests/app/test_openapi.py`` runs schemathesis against the result: an answer the document does
not describe fails the suite.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.config import Settings
from app.security import SESSION_COOKIE
from app.subjects.base_models import offered

# Operations anyone may call: how one gets an account and a token, and the catalogue of styles.
PUBLIC = {
    ("post", "/api/v1/auth/signup"),
    ("post", "/api/v1/auth/token"),
    ("get", "/api/v1/style-packs"),
    ("get", "/api/v1/base-models"),
    # The emailed links: whoever holds one is who it names. The reset request answers alike for all.
    ("post", "/api/v1/auth/verify-email"),
    ("post", "/api/v1/auth/password/forgot"),
    ("post", "/api/v1/auth/password/reset"),
}

BUSY = "The server is busy hashing other passwords; try again after Retry-After seconds."
# Errors of particular operations, beyond the ones every operation of its kind has (see below).
ROUTE_ERRORS: dict[tuple[str, str], dict[int, str]] = {
    ("post", "/api/v1/auth/signup"): {
        400: "The email or the password breaks a rule; the detail names it.",
        403: "The operator closed sign-ups (STUDIO_SIGNUPS_OPEN=false).",
        409: "An account with this email exists.",
        429: "This address created STUDIO_MAX_SIGNUPS_PER_HOUR accounts in the last hour; see Retry-After.",
        503: BUSY,
    },
    ("post", "/api/v1/auth/token"): {
        401: "The email or the password is wrong.",
        429: "Too many failed attempts from this address or on this account; see Retry-After.",
        503: BUSY,
    },
    ("post", "/api/v1/tokens"): {400: "The name is empty, or longer than 100 characters."},
    ("post", "/api/v1/subjects"): {
        400: "The multipart body could not be read, or ended before its closing boundary (nothing is stored).",
        413: "The body is over the request limit, or one photo passed STUDIO_MAX_PHOTO_BYTES while it "
             "arrived ({detail, files: [{name, reason}]}), or more photos than allowed.",
        415: "The body is not multipart/form-data.",
    },
    ("post", "/api/v1/jobs/{job_id}/cancel"): {409: "The job has already ended."},
    ("post", "/api/v1/auth/verify-email"): {400: "The token is not valid, has expired, or was used already."},
    ("post", "/api/v1/auth/verify-email/resend"): {
        409: "The address is confirmed already.",
        429: "Three links were asked for in the last hour; see Retry-After.",
    },
    ("post", "/api/v1/auth/password/forgot"): {
        429: "Too many requests from this address or for this email; see Retry-After.",
    },
    ("post", "/api/v1/auth/password/reset"): {
        400: "The token is not valid, has expired or was used (the detail says which), or the new password "
             "breaks a rule (then the token still works).",
        503: BUSY,
    },
    ("post", "/api/v1/me/delete"): {
        403: "The password is wrong (or a session's write without its X-CSRF-Token header).",
        429: "Too many wrong passwords; see Retry-After.",
        503: BUSY,
    },
    ("post", "/api/v1/me/exports"): {409: "An export of the account is being built already."},
    ("post", "/api/v1/subjects/{subject_id}/generate"): {
        409: "The studio has no trained model yet, or a job of it is still running.",
        429: "The account has its maximum of queued and running jobs; see Retry-After.",
    },
    ("post", "/api/v1/images/{image_id}/more"): {
        409: "The studio has no trained model yet, or a job of it is still running.",
        429: "The account has its maximum of queued and running jobs; see Retry-After.",
    },
}
# Files are streamed from local storage, or answered with a redirect to a short-lived signed URL on S3.
REDIRECTED = {
    ("get", "/api/v1/images/{image_id}/file"),
    ("get", "/api/v1/subjects/{subject_id}/photos/{photo_id}"),
    ("get", "/api/v1/subjects/{subject_id}/model/{variant}"),
    ("get", "/api/v1/me/exports/{export_id}/download"),
}
# Answers whose 422 is a sentence (a request that parsed but asks for something impossible), not a
# list of validation errors.
SENTENCE_422 = {
    ("post", "/api/v1/subjects/{subject_id}/generate"),
    ("post", "/api/v1/images/{image_id}/more"),
    ("patch", "/api/v1/subjects/{subject_id}"),
}

ERROR_SCHEMA = {
    "title": "Error",
    "type": "object",
    "required": ["detail"],
    "properties": {"detail": {"type": "string", "description": "What went wrong, in a sentence."}},
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again.", "schema": {"type": "integer"}}}
WRITE_METHODS = {"post", "put", "patch", "delete"}


def error_response(description: str, status_code: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if status_code in (429, 503):
        response["headers"] = copy.deepcopy(RETRY_AFTER)
    return response


def complete(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Add authentication, error answers and the upload's limits to FastAPI's ``schema`` (in place)."""
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    components["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer",
                   "description": "A token from POST /api/v1/auth/token or the account page."},
        "session": {"type": "apiKey", "in": "cookie", "name": SESSION_COOKIE,
                    "description": "A signed-in browser's session; its writes also need the X-CSRF-Token header."},
    }
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            key = (method, path)
            responses: dict[str, Any] = operation.setdefault("responses", {})

            def add(status_code: int, description: str, responses: dict[str, Any] = responses) -> None:
                responses.setdefault(str(status_code), error_response(description, status_code))

            if key in PUBLIC:
                operation["security"] = []
            else:
                operation["security"] = [{"bearer": []}, {"session": []}]
                add(401, "No valid bearer token or session.")
                if method in WRITE_METHODS:
                    add(403, "A session's write without the right X-CSRF-Token header.")
            if "{" in path:
                add(404, "No such object of the caller's: unknown, or another account's.")
            specific = ROUTE_ERRORS.get(key, {})
            if "requestBody" in operation:
                too_large = f"The body is over the request limit ({settings.request_body_limit // (1024 * 1024)} MB)."
                add(413, specific.get(413, too_large))
                add(408, f"Nothing of the body arrived for {settings.request_body_timeout_seconds:g} seconds; "
                         "the connection is closed.")
                if "application/json" in operation["requestBody"].get("content", {}):
                    unparsable = "The body is not valid JSON."
                    add(400, f"{specific[400]} Or: {unparsable}" if 400 in specific else unparsable)
            for status_code, description in specific.items():
                add(status_code, description)
            if key in REDIRECTED:
                responses.setdefault("307", {
                    "description": "On S3 storage: a redirect to a short-lived signed URL of the file.",
                    "headers": {"Location": {"schema": {"type": "string"}}},
                })
            if key in SENTENCE_422:
                validation = responses.get("422", {}).get("content", {}).get("application/json", {}).get("schema")
                choices = [validation] if validation else []
                responses["422"] = {
                    "description": "The request is invalid; the detail says why.",
                    "content": {"application/json": {"schema": {
                        "anyOf": [*choices, {"$ref": "#/components/schemas/Error"}]}}},
                }
    _upload_limits(schema, settings)
    return schema


def _upload_limits(schema: dict[str, Any], settings: Settings) -> None:
    """The studio upload's photo count and base models come from the settings, so the document says this server's."""
    operation = schema.get("paths", {}).get("/api/v1/subjects", {}).get("post")
    if operation is None:
        return
    body = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data", {}).get("schema", {})
    choice = body.get("properties", {}).get("base_model")
    if choice is not None:
        # The offered keys are this server's settings, like the photo limits.
        keys = [offer.key for offer in offered(settings)]
        choice["enum"] = keys
        choice["default"] = keys[0]
    photos = body.get("properties", {}).get("photos")
    if photos is not None:
        photos["minItems"] = settings.min_photos
        photos["maxItems"] = settings.max_photos
        photos["description"] = (f"JPEG, PNG, WebP or HEIC photos, {settings.min_photos} to {settings.max_photos}; "
                                 f"each at most {settings.max_photo_bytes // (1024 * 1024)} MB.")


def install(app: FastAPI, settings: Settings) -> None:
    """Serve the completed document at ``app.openapi_url`` (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            generated = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                    description=app.description)
            # A copy: the generated document shares dicts with the routes' openapi_extra.
            app.openapi_schema = complete(copy.deepcopy(generated), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
