# The guide's "Database Connection", only the import line changed.
from secrets_broker.aws_secrets import get_database_config
from supabase import create_client, Client


def create_supabase_client() -> Client:
    """Create Supabase client using secrets"""
    config = get_database_config()

    supabase: Client = create_client(
        config["supabase_url"],
        config["supabase_anon_key"]
    )
    return supabase


client = create_supabase_client()
print(f"supabase client for {client.supabase_url}")
