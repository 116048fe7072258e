"""The site's own ClientApp worker: the code that answers the coordinator is the code the hospital
installed, imported once and kept warm.

``ccmr-client start`` runs the SuperNode with ``--isolation process``: the SuperNode then starts
nothing itself and only holds each message the coordinator sends until a worker takes it from its
local Runtime API (127.0.0.1). This worker takes them, one at a time, in one long-lived process:

* it runs the ClientApp of the site's installed package (``client.client_app.app``), never the
  app (FAB) the coordinator ships, so no coordinator code is imported or run at the hospital and
  the site's rules (client/policy.py, client/egress.py) cannot be left out of it;
* the FAB is still read (as data, never imported): its code hash is what a site policy's
  ``allowed_code`` pins, and a FAB whose code differs from the site's own is reported in the log;
* imports (torch, Opacus, Flower) happen once, and the site's datasets stay in memory between
  messages (client/local.load_sites), instead of a fresh process per message.

Flower's own ``flwr-clientapp`` does the same exchange for one message and then exits
(flwr/supernode/runtime/run_clientapp.py); this module reuses its pull and push functions.
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
import zipfile
from pathlib import Path

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_utils import ObjectPullError
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from ccmr_core.codehash import code_hash
from ccmr_core.proc import Stopped
from client.egress import FAILED
from client.policy import APP_ROOT, FAB_CODE_KEY
from protocol.transfer import pull_message

log = logging.getLogger("ccmr.client")
MAX_FAB_BYTES = 256 * 2**20  # a FAB larger than this is not unpacked to compute its hash
# how long a message's content may take to reach the SuperNode. Flower waits up to 2 hours; a
# SuperNode also hands out a message of a run the coordinator stopped while it was arriving, whose
# content never comes, and one worker must not wait for it that long
CONTENT_WAIT_S = 60.0
RUNTIME_RETRY_S = 60.0  # how long a call to the SuperNode's Runtime API is retried


def pull_task_input(client: RuntimeHttpClient, max_time: float = CONTENT_WAIT_S):
    """Flower's run_clientapp.pull_task_input, with a bound on the wait for the message's content."""
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode handed out a task without a message")
    # the SuperNode hands a message out before its content has arrived: protocol/transfer retries soon
    message = pull_message(client, pulled.message_object_trees[0], Node(node_id=context.node_id), context.run_id,
                           max_time)
    return message, context, run, fab


def fab_code_hash(content: bytes) -> str:
    """The code hash (ccmr_core.codehash) of the files in a FAB, unpacked to a temporary folder as
    data; nothing of it is imported."""
    if len(content) > MAX_FAB_BYTES:
        raise ValueError(f"the coordinator's app is {len(content) / 2**20:.0f} MiB, more than {MAX_FAB_BYTES >> 20} MiB")
    with tempfile.TemporaryDirectory(prefix="ccmr-fab-") as tmp, zipfile.ZipFile(io.BytesIO(content)) as z:
        if sum(i.file_size for i in z.infolist()) > MAX_FAB_BYTES:
            raise ValueError(f"the coordinator's app unpacks to more than {MAX_FAB_BYTES >> 20} MiB")
        root = Path(tmp).resolve()
        for info in z.infolist():
            target = (root / info.filename).resolve()
            if root not in target.parents or info.is_dir():
                continue  # absolute paths and ../ entries are not unpacked
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(info))
        return code_hash(root)


class SiteWorker:
    """Takes the SuperNode's messages from its Runtime API at ``address`` and answers each with
    ``app`` (default: this site's installed ClientApp)."""

    def __init__(self, address: str, app=None, poll_s: float = 0.1):
        if app is None:
            from client.client_app import app  # the site's own code, imported once
        self.address, self.app, self.poll_s = address, app, poll_s
        self.own_hash = code_hash(APP_ROOT)
        self._fab_hashes: dict[str, str] = {}

    def _client(self, *interceptors) -> RuntimeHttpClient:
        retry = make_simple_http_retry_invoker()
        retry.max_time = RUNTIME_RETRY_S  # the SuperNode is on this machine: gone for long means it stopped
        return RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=True, root_certificates=None, interceptors=list(interceptors),
            retry_invoker=retry)

    def serve(self, alive=lambda: True) -> None:
        """Answer messages until ``alive()`` turns false (the SuperNode ended); SIGTERM / Ctrl-C end it
        through ``ccmr_core.proc.stop_signals`` in the caller."""
        control = self._client(RuntimeVersionHttpInterceptor(component_name="SuperExec"))
        try:
            while alive():
                try:
                    res = control.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
                except Exception:  # noqa: BLE001
                    if not alive():
                        return  # the SuperNode stopped while this worker was asking it
                    raise
                if res.HasField("task") and res.token:
                    self.run_task(res.token)
                else:
                    time.sleep(self.poll_s)
        finally:
            control.close()

    def _fab_hash(self, fab) -> str:
        if fab.hash_str not in self._fab_hashes:
            self._fab_hashes[fab.hash_str] = fab_code_hash(fab.content)
            h = self._fab_hashes[fab.hash_str]
            if h != self.own_hash:
                log.warning("the coordinator's app has code hash %s..., this site's installed code %s...: this "
                            "site answers with its own code", h[:16], self.own_hash[:16])
        return self._fab_hashes[fab.hash_str]

    def run_task(self, token: str) -> None:
        """One message: pull it, answer it with the site's app, push the reply (Flower's
        run_clientapp without installing or importing the FAB, and without exiting)."""
        client = self._client(RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                              RuntimeTokenHttpInterceptor(token))
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = context = reply = None
        status, details = SubStatus.FAILED, "the site could not complete this request"
        stopping = False
        try:
            message, context, _, fab = pull_task_input(client)
            # what the coordinator shipped, as the site's policy sees it (client/policy.violations)
            context.node_config[FAB_CODE_KEY] = self._fab_hash(fab)
            reply = self.app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Stopped:
            stopping = True  # the site asked this worker to stop: leave at once, report nothing
            raise
        except ObjectPullError:
            log.warning("a message's content did not reach this SuperNode within %.0f s (a run the coordinator "
                        "stopped?); skipped", CONTENT_WAIT_S)
        except Exception:  # noqa: BLE001 - the detail stays in the site's log
            log.exception("a message could not be answered")
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=FAILED), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None and not stopping:
                    push_message(client, reply, context)
            finally:
                if not stopping:
                    push_task_output(client, context, status, details)
                heartbeat.stop()
                client.close()
