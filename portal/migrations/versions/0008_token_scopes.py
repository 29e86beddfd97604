"""token scopes: what an API token may do (space-separated scopes; "" is the account's full
access, as every token made before had) and the one service it may call (an invoke key)

Revision ID: 0008_token_scopes
Revises: 0007_sessions
Create Date: 2026-12-06
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0008_token_scopes'
down_revision = '0007_sessions'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('api_tokens') as batch:
        batch.add_column(sa.Column('scopes', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False,
                                   server_default=''))
        batch.add_column(sa.Column('service_id', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('api_tokens') as batch:
        batch.drop_column('service_id')
        batch.drop_column('scopes')
