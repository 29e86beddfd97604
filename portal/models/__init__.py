"""The portal's data models, the SQLModel way: ``tables`` holds the database tables; each
resource has a base with its fields and their validation, a create model (what the form, the
API and the CLI send) and a public model (what the API answers), in one module per resource."""
from portal.models.tables import (ApiToken, BuildState, DataSourceRecord, Event, EventKind, IdempotencyKey,  # noqa: F401
                                  Image, ImageBuild, ImageState, RegistryCredential,
                                  Job, LoginFailure, NodeCondition, NodeRecord, Project, ProjectMember,
                                  Service, ServiceReplica, ServiceState, User, WebSession, new_id, utcnow)
