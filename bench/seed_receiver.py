# The published receiver example (shared/seed, April 2023), made runnable for
# the benchmark and changed only where it cannot run as published:
# - secret_key, which the example leaves to the reader, comes from the
#   TRIVIALSEC_WEBHOOK_SECRET environment variable;
# - its last line printed payload.body, an attribute the model does not have
#   (every delivery would end in a 500); it prints payload.payload.
# Run: TRIVIALSEC_WEBHOOK_SECRET=... /usr/bin/python3 -m uvicorn seed_receiver:app --workers 1
import os
from enum import Enum
from uuid import UUID
from datetime import datetime, timezone

import jwt
from fastapi import FastAPI, Header, APIRouter, Response, status
from pydantic import BaseModel, validator

JITTER_SECONDS = 3
ACCOUNT_NAME = os.environ.get("TRIVIALSEC_ACCOUNT", "bench")
secret_key = os.environ["TRIVIALSEC_WEBHOOK_SECRET"]


class WebhookEvent(str, Enum):
    HOSTED_MONITORING = "hosted_monitoring"
    HOSTED_SCANNER = "hosted_scanner"
    SELF_HOSTED_UPLOADS = "self_hosted_uploads"
    EARLY_WARNING_EMAIL = "early_warning_email"
    EARLY_WARNING_DOMAIN = "early_warning_domain"
    EARLY_WARNING_IP = "early_warning_ip"
    NEW_FINDINGS_CERTIFICATES = "new_findings_certificates"
    NEW_FINDINGS_DOMAINS = "new_findings_domains"
    CLIENT_STATUS = "client_status"
    CLIENT_ACTIVITY = "client_activity"
    SCANNER_CONFIGURATIONS = "scanner_configurations"
    REPORT_CREATED = "report_created"
    REPORT_DELETED = "report_deleted"
    ACCOUNT_ACTIVITY = "account_activity"
    MEMBER_ACTIVITY = "member_activity"


class WebhookPayload(BaseModel):
    event_id: UUID
    event_name: WebhookEvent
    timestamp: datetime
    payload: dict

    class Config:
        validate_assignment = True

    @validator("timestamp")
    def set_timestamp(cls, timestamp: datetime):
        return timestamp.replace(tzinfo=timezone.utc) if timestamp else None


router = APIRouter()


@router.post("/trivialsec", status_code=status.HTTP_200_OK)
async def webhook_trivialsec(
    payload: WebhookPayload,
    authorization: str = Header(alias="Authorization", title="Bearer JWT", default=""),
):
    if not authorization.startswith("Bearer "):
        return Response(status_code=status.HTTP_403_FORBIDDEN)
    bearer_token = authorization[7:]
    if not bearer_token.strip():
        return Response(status_code=status.HTTP_403_FORBIDDEN)
    try:
        decoded = jwt.decode(
            jwt=bearer_token,
            key=secret_key,
            options={"require": ["iat", "nbf", "exp", "aud", "iss", "sub"]},
            leeway=JITTER_SECONDS,
            audience=f"urn:trivialsec:webhook:client_endpoint:{ACCOUNT_NAME}",
            issuer="https://www.trivialsec.com",
            algorithms=["HS256"],
        )
    except jwt.InvalidSignatureError:
        return Response(status_code=status.HTTP_403_FORBIDDEN)
    except jwt.ExpiredSignatureError:
        return Response(status_code=status.HTTP_403_FORBIDDEN)
    if decoded.get("sub") != "urn:uuid:bc6e2cd5-1f59-487f-b05b-49946bd078b2":
        return Response(status_code=status.HTTP_403_FORBIDDEN)
    if decoded.get("eid") != payload.event_id.urn:
        return Response(status_code=status.HTTP_403_FORBIDDEN)
    print(payload.event_name)
    print(payload.timestamp)
    print(payload.payload)


app = FastAPI()
app.include_router(router, prefix="/webhook")
