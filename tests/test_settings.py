from comfy_courier.executor.settings import Settings


def test_defaults_and_problems_for_an_empty_environment():
    s = Settings.from_env({})
    assert s.api_keys == () and s.storage == "local" and s.bucket == "comfy-outputs"
    assert s.max_queue == 100 and s.job_timeout == 1800 and s.max_body_bytes == 10 * 1024 * 1024
    assert s.retry_horizon == 86400 and s.max_attempts == 2 and not s.keep_metadata
    assert s.retention_days == 30
    assert any("COURIER_API_KEY" in p for p in s.problems)


def test_lists_are_comma_separated_and_secrets_stay_out_of_repr():
    s = Settings.from_env({"COURIER_API_KEY": "aaaaaaaaaaaaaaaaaaaa, bbbbbbbbbbbbbbbbbbbb",
                           "COURIER_CALLBACK_API_KEY": "cb-secret-value",
                           "SUPABASE_URL": "https://x.supabase.co/",
                           "SUPABASE_SERVICE_ROLE_KEY": "service-secret"})
    assert s.api_keys == ("aaaaaaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbbbbbb")
    assert s.storage == "supabase" and s.supabase_url == "https://x.supabase.co"
    text = repr(s)
    for secret in s.secrets:
        assert secret not in text


def test_bad_values_fall_back_with_one_problem_each():
    s = Settings.from_env({"COURIER_API_KEY": "k" * 20, "COURIER_MAX_QUEUE": "lots",
                           "COURIER_JOB_TIMEOUT": "-5", "COURIER_STORAGE": "s3",
                           "COURIER_URL_MODE": "weird", "COURIER_CALLBACK_URL": "ftp://x",
                           "COURIER_WEBHOOK_SECRET": "whsec_!!!notbase64",
                           "COURIER_RETENTION_DAYS": "-1"})
    assert s.max_queue == 100 and s.job_timeout == 1800 and s.storage == "local"
    assert s.url_mode == "public" and s.callback_url is None and s.webhook_secrets == ()
    assert s.retention_days == 30
    assert len(s.problems) == 7


def test_supabase_without_key_falls_back_to_local():
    s = Settings.from_env({"COURIER_STORAGE": "supabase", "SUPABASE_URL": "https://x.co"})
    assert s.storage == "local"
    assert any("SUPABASE_SERVICE_ROLE_KEY" in p for p in s.problems)
