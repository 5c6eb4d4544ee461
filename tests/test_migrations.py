"""The migration history is one line: `alembic upgrade head` works, every revision has
one parent, and a database migrated while the history had branches moves on."""

from __future__ import annotations

import psycopg
import pytest
from alembic.script import ScriptDirectory

from cluster.servers import RegionServers
from region_node.migrate import MIGRATIONS_DIR, _config, upgrade
from tests.conftest import fresh_database


def test_history_has_one_head() -> None:
    script = ScriptDirectory.from_config(_config("postgresql://unused/none"))
    assert len(script.get_heads()) == 1, script.get_heads()
    for rev in script.walk_revisions():
        assert not isinstance(rev.down_revision, tuple | list), f"{rev.revision} is a merge"
    assert MIGRATIONS_DIR.is_dir()


@pytest.mark.integration
def test_a_database_from_the_branched_history_upgrades(servers: RegionServers) -> None:
    with fresh_database(servers) as url:
        head = ScriptDirectory.from_config(_config(url)).get_current_head()
        with psycopg.connect(url, autocommit=True) as conn:
            # What "upgrade heads" left behind when 0005, 0006 and 0009 all revised 0004.
            conn.execute("delete from alembic_version")
            conn.execute("insert into alembic_version values ('0005'), ('0006'), (%s)",
                         (head,))
        upgrade(url)
        with psycopg.connect(url) as conn:
            assert conn.execute("select version_num from alembic_version").fetchall() == [
                (head,)]
