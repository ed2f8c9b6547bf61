"""The service secret signs paging cursors and idempotency fingerprints: no service starts without one, and
the all-in-one mode always has one to hand its services."""
from __future__ import annotations


import pytest
from harness import run

from bookshop import wiring
from bookshop.app import ServiceContext
from bookshop.settings import Settings, SettingsError
from bookshop.supervisor import Supervisor


@pytest.mark.parametrize("service", ["catalog", "orders"])
def test_a_service_that_signs_cursors_refuses_to_start_without_the_secret(service):
    async def scenario():
        # a database nobody listens on: the refusal must come before any database work
        ctx = ServiceContext(service, Settings(mongodb_uri="mongodb://127.0.0.1:9", service_secret=""))
        try:
            with pytest.raises(SettingsError, match="BOOKSHOP_SERVICE_SECRET"):
                await wiring.BUILDERS[service](ctx)
        finally:
            await ctx.close()
    run(scenario())


def test_the_all_in_one_mode_hands_every_service_a_generated_secret(tmp_path):
    settings = Settings.from_env({"BOOKSHOP_DATA_DIR": str(tmp_path)})
    assert settings.service_secret == ""
    env = Supervisor(settings)._child_env("mongodb://127.0.0.1:27017")
    assert len(env["BOOKSHOP_SERVICE_SECRET"]) >= 32
    # the services it starts read it back as their own setting, and a second start keeps it
    assert Settings.from_env(env).service_secret == env["BOOKSHOP_SERVICE_SECRET"]
    again = Supervisor(Settings.from_env({"BOOKSHOP_DATA_DIR": str(tmp_path)}))._child_env("mongodb://x")
    assert again["BOOKSHOP_SERVICE_SECRET"] == env["BOOKSHOP_SERVICE_SECRET"]
