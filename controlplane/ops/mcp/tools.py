"""The MCP tools: the spec's six OrchestrationTools methods under their own names and signatures,
plus the cluster's status and syscalls and the bus. Each returns the spec's dict (structured
content, and JSON text for clients that read only text); a failure is a tool error carrying
the message the CLI prints for it, and the server keeps serving.

Arguments are validated where the client validates them (`KcpClient`, `parse_request`), so an
agent reads the same messages a person does; the input schemas are built from the same models
(`ClusterConfig`, the syscalls' argument models), so an agent can tell the shapes beforehand.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Annotated, Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError
from mcp.types import ToolAnnotations
from pydantic import Field, WithJsonSchema

from controlplane.bus.codec import check_topic
from controlplane.bus.core import InterKernelBus
from controlplane.client.core import KcpClient
from controlplane.client.tools import OrchestrationTools
from controlplane.errors import ClusterNotFound, KcpError
from controlplane.ops.explain import explain_error
from controlplane.protocol.models import BusMessage, BusTopic, ClusterConfig, KernelState
from controlplane.protocol.requests import ARG_MODELS, SYSCALL_NAME_PATTERN, SyscallRequest
from controlplane.settings import Settings
from kernel_agent.syscalls import builtin_registry

Result = dict[str, Any]

#: What each builtin syscall does, as its handler registers it.
BUILTIN_DESCRIPTIONS: dict[str, str] = {d["name"]: d["description"] for d in builtin_registry().describe()}
_USER_SYSCALL = "a user syscall: its handler checks its own arguments"
_FREE_FORM = {"type": "object", "description": _USER_SYSCALL}
_PIN = "kernel"  # the request key OrchestrationTools.dispatch takes as the kernel to run on


def request_schema() -> dict[str, Any]:
    """JSON Schema of `dispatch`'s request: one variant per builtin syscall (its argument model's
    fields), one for user syscalls (their handlers check their own arguments)."""
    envelope = SyscallRequest.model_json_schema()["properties"]
    common = {
        "requires": {**envelope["requires"], "description": "capabilities the kernel must have"},
        _PIN: {
            "type": "string",
            "description": "run on this kernel (e.g. worker-0) instead of the one the router picks: "
            "memory is per kernel, so a READ of what a WRITE wrote names the WRITE's kernel; "
            "worker-0@7 (the WRITE's kernel@epoch) fails with KernelGone if that process was "
            "restarted since (a restart empties its memory)",
        },
    }
    variants: list[dict[str, Any]] = []
    for name, model in ARG_MODELS.items():
        args = model.model_json_schema()
        variants.append(
            {
                "title": name,
                "description": BUILTIN_DESCRIPTIONS.get(name, ""),
                "type": "object",
                "properties": {"type": {"const": name}, **common, **args["properties"]},
                "required": ["type", *args.get("required", [])],
                "additionalProperties": False,
            }
        )
    variants.append(
        {
            "title": "user syscall",
            "description": "a syscall a handler module registers on the agents (cluster_syscalls lists "
            "them); its other fields are its arguments",
            "type": "object",
            "properties": {
                "type": {
                    "type": "string",
                    "pattern": SYSCALL_NAME_PATTERN,
                    "not": {"enum": list(ARG_MODELS)},
                },
                **common,
            },
            "required": ["type"],
        }
    )
    return {
        "type": "object",
        "description": 'a syscall: {"type": NAME, ...its fields}, e.g. {"type": "READ", "address": 4096, '
        '"size": 256}',
        "anyOf": variants,
    }


def _config_schema() -> dict[str, Any]:
    return {"anyOf": [ClusterConfig.model_json_schema(), {"type": "null"}], "default": None}


# The argument types: what the client validates (plain types), what the schema advertises.
ClusterName = Annotated[str, Field(description="cluster name: 1-64 letters, digits, '_', '.', '-'")]
KernelCount = Annotated[
    int, Field(description="number of kernels, within the config's [min_kernels, max_kernels]")
]
Config = Annotated[
    dict[str, Any] | None,
    WithJsonSchema(_config_schema()),
    Field(description="sizing and placement: min_kernels, max_kernels, auto_scale, thresholds, capabilities"),
]
Request = Annotated[dict[str, Any], WithJsonSchema(request_schema())]
Payload = Annotated[dict[str, Any], Field(description="the message: any JSON object")]
Topic = Annotated[
    str, Field(description="bus topic", json_schema_extra={"enum": [t.value for t in BusTopic]})
]
KernelName = Annotated[str, Field(description="a kernel name on the bus (a registered one, for to_kernel)")]


class _RaisingTools(OrchestrationTools):
    """OrchestrationTools whose failures raise, so the tool layer reports them as tool errors."""

    async def _call(self, op: Callable[[KcpClient], Awaitable[Result]]) -> Result:
        return await op(await self.client())


class KcpTools:
    """The tool functions over one OrchestrationTools and one InterKernelBus (shared by every
    MCP session of the process). `register` adds them to a server; `aclose` disconnects."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tools = _RaisingTools(settings)
        self.bus = InterKernelBus(settings)

    async def aclose(self) -> None:
        await self.tools.aclose()
        await self.bus.aclose()

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except KcpError as exc:
            raise ToolError(explain_error(exc, self.settings)[0]) from exc

    # ------------------------------------------------------------ the spec's six methods
    async def create_cluster(
        self, name: ClusterName, kernel_count: KernelCount = 1, config: Config = None
    ) -> Result:
        """Create a cluster of `kernel_count` kernels and wait until they run (or the wait ends:
        `running` then says how many do and `reason` why not). Fails if the name is taken."""
        with self._errors():
            return await self.tools.create_cluster(name, kernel_count, config)

    async def destroy_cluster(self, name: ClusterName) -> Result:
        """Stop every kernel of the cluster and delete it; requests still queued fail."""
        with self._errors():
            return await self.tools.destroy_cluster(name)

    async def list_clusters(self) -> Result:
        """Every cluster: status, kernel count (desired and running), kernel names, config."""
        with self._errors():
            return await self.tools.list_clusters()

    async def dispatch(self, cluster: ClusterName, request: Request) -> Result:
        """Run one syscall on a kernel of the cluster and return its result, the kernel that ran
        it, its incarnation (epoch) and the latency. cluster_syscalls lists what a cluster's
        kernels run."""
        with self._errors():
            return await self.tools.dispatch(cluster, request)

    async def get_metrics(self, cluster: ClusterName) -> Result:
        """The cluster's totals (dispatches, errors, average latency) and its kernels' average load."""
        with self._errors():
            return await self.tools.get_metrics(cluster)

    async def scale_cluster(self, cluster: ClusterName, target_count: KernelCount) -> Result:
        """Set the cluster's kernel count and wait for it. Scaling down drains the kernels it
        removes: they take no new work, finish what they hold, then stop."""
        with self._errors():
            return await self.tools.scale_cluster(cluster, target_count)

    # ------------------------------------------------------------ for an agent running clusters
    async def cluster_status(self, cluster: ClusterName) -> Result:
        """The cluster (what `kcp status` shows): status, config, and each kernel with its agent,
        host, state, syscalls and latest load (cpu, memory, queue_depth, latency_ms, error_rate)."""
        with self._errors():
            kcp = await self.tools.client()
            info = await kcp.get_cluster(cluster)
            loads = await kcp.state.loads(info.kernels)
            data = info.model_dump(mode="json")
            for kernel in data["kernels"]:
                load = loads.get(kernel["name"])
                kernel["load"] = load.model_dump(mode="json", exclude={"name"}) if load else None
            return {"success": True, "cluster": data}

    async def cluster_syscalls(self, cluster: ClusterName) -> Result:
        """The syscalls the cluster's running kernels execute, each with its argument schema (the
        fields of a dispatch request) and the kernels that run it."""
        with self._errors():
            info = await (await self.tools.client()).get_cluster(cluster)
        kernels: dict[str, list[str]] = {}
        for k in info.kernels:
            if k.state is KernelState.RUNNING:
                for name in k.syscalls.split():
                    kernels.setdefault(name, []).append(k.name)
        syscalls = [
            {
                "name": name,
                "builtin": name in ARG_MODELS,
                "description": BUILTIN_DESCRIPTIONS.get(
                    name, "a user syscall: its handler checks its arguments"
                ),
                "arguments": ARG_MODELS[name].model_json_schema()
                if name in ARG_MODELS
                else {"type": "object"},
                "kernels": sorted(names),
            }
            for name, names in sorted(kernels.items())
        ]
        return {"success": True, "cluster": info.name, "syscalls": syscalls}

    async def bus_publish(self, topic: Topic, payload: Payload, from_kernel: KernelName = "mcp") -> Result:
        """Publish a message to a topic of the inter-kernel bus: every kernel subscribed to it gets it."""
        with self._errors():
            message = BusMessage(from_kernel=from_kernel, topic=check_topic(topic), payload=payload)
            published = await self.bus.publish(message)
        return {"success": True, "stream": message.topic.value, "id": published.id, "seq": published.seq}

    async def send_direct(
        self, from_kernel: KernelName, to_kernel: KernelName, payload: Payload, topic: Topic = "data"
    ) -> Result:
        """Send a message to one registered kernel's inbox on the bus."""
        with self._errors():
            published = await self.bus.send_direct(from_kernel, to_kernel, payload, topic=check_topic(topic))
        return {"success": True, "stream": f"inbox:{to_kernel}", "id": published.id, "seq": published.seq}

    async def bus_stats(self) -> Result:
        """The bus: registered and live kernels, subscriptions, stream lengths, pending messages,
        dead letters and gaps per topic."""
        with self._errors():
            stats = await asyncio.to_thread(self.bus.get_stats)  # a blocking client (see InterKernelBus)
        stats.pop("local", None)  # this process's delivery counters: it delivers nothing
        return stats

    # ------------------------------------------------------------ resources
    async def _cluster_resource(self, name: str) -> str:
        try:
            return json.dumps((await self.cluster_status(name))["cluster"])
        except ToolError as exc:
            if isinstance(exc.__cause__, ClusterNotFound):
                raise ResourceNotFoundError(str(exc.__cause__)) from exc
            raise ResourceError(str(exc)) from exc

    def register(self, server: MCPServer[Any]) -> None:
        """Add the tools (with their MCP annotations) and the cluster status resource to `server`."""

        def hints(
            read_only: bool = False,
            destructive: bool = False,
            idempotent: bool = False,
            open_world: bool = False,
        ) -> ToolAnnotations:
            return ToolAnnotations(
                read_only_hint=read_only,
                destructive_hint=None if read_only else destructive,  # the spec defines them for writers only
                idempotent_hint=None if read_only else idempotent,
                open_world_hint=open_world,
            )

        read_only = hints(read_only=True)
        tools: list[tuple[Callable[..., Awaitable[Result]], str, ToolAnnotations]] = [
            (self.create_cluster, "Create a cluster", hints()),
            (self.destroy_cluster, "Destroy a cluster", hints(destructive=True, idempotent=True)),
            (self.list_clusters, "List clusters", read_only),
            # WRITE and FREE change a kernel's memory; user syscalls do what their handlers do
            (self.dispatch, "Run a syscall on a cluster", hints(destructive=True, open_world=True)),
            (self.get_metrics, "Cluster metrics", read_only),
            (self.scale_cluster, "Scale a cluster", hints(destructive=True, idempotent=True)),
            (self.cluster_status, "Cluster status", read_only),
            (self.cluster_syscalls, "Syscalls of a cluster", read_only),
            (self.bus_publish, "Publish on the bus", hints()),
            (self.send_direct, "Message one kernel", hints()),
            (self.bus_stats, "Bus statistics", read_only),
        ]
        builtins = "; ".join(f"{name} {{{', '.join(m.model_fields)}}}" for name, m in ARG_MODELS.items())
        described: dict[Callable[..., Awaitable[Result]], str] = {
            self.dispatch: f"{inspect.getdoc(self.dispatch)} Builtins and their fields: {builtins}."
        }
        for fn, title, hinted in tools:
            server.add_tool(fn, title=title, description=described.get(fn), annotations=hinted)
        server.resource(
            "kcp://clusters/{name}",
            name="cluster",
            description="a cluster's status (as the cluster_status tool returns it)",
            mime_type="application/json",
        )(self._cluster_resource)
