"""The guide's FastAPI integration, on secrets-broker: start-up loads the
configs, /health reports the broker connection. Only the import lines
differ from the guide, and /health's check, which runs off the event loop
(`asyncio.to_thread`): the guide calls it inline, and a slow broker (or
AWS, for the guide's class) then stalls every request of the app for the
check's timeout.

    pip install clients/python fastapi uvicorn
    BROKER_ENDPOINT=127.0.0.1:50051 uvicorn app:app --port 8000
"""

import asyncio

from fastapi import FastAPI
from secrets_broker.aws_secrets import get_database_config, get_jwt_config

app = FastAPI()


@app.on_event("startup")
async def startup_event():
    """Initialize secrets on startup"""
    try:
        db_config = get_database_config()
        jwt_config = get_jwt_config()
        print("✅ Secrets loaded successfully")
    except Exception as e:
        print(f"❌ Failed to load secrets: {e}")
        raise


@app.get("/health")
async def health_check():
    """Health check endpoint"""
    try:
        from secrets_broker.aws_secrets import test_aws_connection
        aws_healthy = await asyncio.to_thread(test_aws_connection)
        return {
            "status": "healthy" if aws_healthy else "degraded",
            "aws_secrets": "connected" if aws_healthy else "disconnected"
        }
    except Exception as e:
        return {"status": "unhealthy", "error": str(e)}
