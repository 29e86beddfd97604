"""Health and recovery events on the pages: node events on the cluster page (each change once,
an admin's drain not repeated by the monitor), job events on the job's timeline and in the API."""
from sqlmodel import Session, select

from monitor.recovery import NodeCondition
from portal.models import Event, EventKind, NodeRecord, utcnow
from portal.daemons.monitor import record_node
from tests.portal.conftest import bearer
from tests.portal.test_web import add_job, fake_backend, logged_in, settings  # noqa: F401 (fixtures)


def test_node_changes_are_recorded_once_and_shown_on_the_cluster_page(client, engine, users, fake_backend):  # noqa: F811
    reason = "aiportal: gpu_devices: 3 (limit 4)"
    with Session(engine) as db:
        assert record_node(db, "g4n1", NodeCondition.UP, "") is False           # first sight: no event
        db.commit()
        assert record_node(db, "g4n1", NodeCondition.DRAIN, reason) is True
        assert record_node(db, "g4n1", NodeCondition.DRAIN, reason) is False    # no change, no event
        assert record_node(db, "g4n1", NodeCondition.DOWN, "Not responding") is True
        assert record_node(db, "g4n1", NodeCondition.UP, "") is True
        db.commit()
        kinds = [(e.kind, e.message) for e in db.exec(select(Event).order_by(Event.id))]
    assert kinds == [(EventKind.DRAIN, "drained by the health check: " + reason),
                     (EventKind.NODE_DOWN, "down: Not responding"),
                     (EventKind.RESUME, "back in service (slurmd answers again)")]
    logged_in(client)
    page = client.get("/cluster").get_data(as_text=True)
    assert "drained by the health check: aiportal: gpu_devices: 3 (limit 4)" in page and "down: Not responding" in page


def test_an_admin_drain_is_not_repeated_by_the_monitor(client, engine, users, fake_backend):  # noqa: F811
    token = logged_in(client, "root-admin")
    client.post("/cluster/nodes/g1n1/drain", data={"csrf": token, "reason": "replacing GPU 0"})
    with Session(engine) as db:
        rec = db.get(NodeRecord, "g1n1")
        assert (rec.condition, rec.reason) == (NodeCondition.DRAIN, "replacing GPU 0 (root-admin)")
        # what the monitor sees next in Slurm is that same drain: no second event
        assert record_node(db, "g1n1", NodeCondition.DRAIN, "replacing GPU 0 (root-admin)") is False
        assert len(db.exec(select(Event).where(Event.node == "g1n1")).all()) == 1


def test_job_events_on_the_timeline_and_in_the_api(client, engine, users, tokens, fake_backend):  # noqa: F811
    job_id = add_job(engine, users["alice"], slurm_job_id="4242")
    with Session(engine) as db:
        db.add(Event(kind=EventKind.REQUEUED, job_id=job_id, user_id=users["alice"].id, node="g4n1",
                     key="requeue:4242:0", at=utcnow(),
                     message="requeued: node g4n1 went down (Not responding); run 2 released from Slurm's requeue hold"))
        db.commit()
    logged_in(client)
    page = client.get("/jobs/%s" % job_id).get_data(as_text=True)
    assert "requeued: node g4n1 went down (Not responding)" in page
    timeline = client.get("/api/v1/jobs/%s" % job_id, headers=bearer(tokens["alice"])).get_json()["events"]
    assert any(e["kind"] == "requeued" and "g4n1 went down" in e["message"] for e in timeline)


def test_two_monitors_seeing_the_same_change_record_it_once(engine):
    with Session(engine) as db:
        record_node(db, "inf1", NodeCondition.UP, "")
        db.commit()
    a, b = Session(engine), Session(engine)
    try:
        a.get(NodeRecord, "inf1"), b.get(NodeRecord, "inf1")      # both read UP
        assert record_node(a, "inf1", NodeCondition.DOWN, "Not responding") is True
        a.commit()
        assert record_node(b, "inf1", NodeCondition.DOWN, "Not responding") is False
        b.commit()
    finally:
        a.close()
        b.close()
    with Session(engine) as db:
        assert len(db.exec(select(Event).where(Event.node == "inf1")).all()) == 1
