"""The Alembic migrations create exactly the schema the models describe, and go down again."""
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

from portal import db as dbmod
from portal import models  # noqa: F401  (registers the tables)


def test_upgrade_matches_the_models_and_is_idempotent(tmp_path):
    engine = dbmod.make_engine("sqlite:///%s/p.db" % tmp_path)
    dbmod.upgrade(engine)
    dbmod.upgrade(engine)
    assert dbmod.current_revision(engine) == dbmod.head_revision()
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert diff == []
    dbmod.check_schema(engine)


def test_downgrade_to_base_and_back(tmp_path):
    engine = dbmod.make_engine("sqlite:///%s/p.db" % tmp_path)
    dbmod.upgrade(engine)
    from alembic import command
    cfg = dbmod.alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
    assert dbmod.current_revision(engine) is None
    dbmod.upgrade(engine)
    assert dbmod.current_revision(engine) == dbmod.head_revision()


def test_an_old_schema_is_refused_with_the_fix(tmp_path):
    import pytest

    from portal.errors import ConfigError
    engine = dbmod.make_engine("sqlite:///%s/p.db" % tmp_path)
    with pytest.raises(ConfigError, match="aiportal db upgrade"):
        dbmod.check_schema(engine)


def test_missing_database_folder_is_named(tmp_path):
    import pytest

    from portal.errors import ConfigError
    with pytest.raises(ConfigError, match="does not exist"):
        dbmod.make_engine("sqlite:///%s/nope/p.db" % tmp_path)
