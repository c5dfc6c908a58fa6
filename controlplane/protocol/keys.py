"""The Redis key schema: every key kcp reads or writes is built here, nowhere else.

All keys start with the configured prefix (default ``kcp:``) and are ``:``-separated.
Every key of one kcp cluster carries the cluster name in braces as its first hash tag
(``kcp:kernel:{web}:w1:queue``), so all of it hashes to one Redis Cluster slot and every script
runs on one node; fleet-wide keys (agents, leader, ...) are untagged. Bus keys are tagged by topic
or kernel, so a stream and its counter share a slot.
Names are validated (`models.NAME_PATTERN`) before they reach this module, so a name
can never inject a separator or a glob character. `docs/redis-keys.md` explains each key.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Values of the `agent:{name}:kernels` fields: run the kernel, or let it drain and stop.
ASSIGN_RUN, ASSIGN_DRAIN = "run", "drain"


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "kcp:"

    # ------------------------------------------------------------ clusters
    def clusters(self) -> str:
        """SET of cluster names."""
        return f"{self.prefix}clusters"

    def cluster(self, cluster: str) -> str:
        """HASH: the cluster record (config JSON, desired count, status)."""
        return f"{self.prefix}cluster:{{{cluster}}}"

    def cluster_kernels(self, cluster: str) -> str:
        """SET of the cluster's kernel names."""
        return f"{self.prefix}cluster:{{{cluster}}}:kernels"

    def cluster_stats(self, cluster: str) -> str:
        """HASH of counters: dispatches, errors, latency_ms_sum (written by kernels on finish)."""
        return f"{self.prefix}cluster:{{{cluster}}}:stats"

    def cluster_rr(self, cluster: str) -> str:
        """STRING counter: the round-robin position every client of the cluster shares."""
        return f"{self.prefix}cluster:{{{cluster}}}:rr"

    def cluster_version(self, cluster: str) -> str:
        """STRING counter: INCR by every write that changes what routing or work stealing sees of
        the cluster (its record, its kernel set, a kernel's state or epoch, an ejection), so
        kernels and clients re-read the records only when it moved."""
        return f"{self.prefix}cluster:{{{cluster}}}:version"

    def cluster_term(self, cluster: str) -> str:
        """STRING: the highest leader term that wrote to the cluster (fence.lua refuses a lower
        one), in the cluster's slot."""
        return f"{self.prefix}cluster:{{{cluster}}}:term"

    def cluster_ejected(self, cluster: str) -> str:
        """ZSET kernel -> ejected-until ms: kernels outlier detection keeps out of routing."""
        return f"{self.prefix}cluster:{{{cluster}}}:ejected"

    def cluster_orphans(self, cluster: str) -> str:
        """ZSET job id -> enqueue ms: jobs taken from a dead kernel, waiting for a live one."""
        return f"{self.prefix}cluster:{{{cluster}}}:orphans"

    def cluster_deferred(self, cluster: str) -> str:
        """ZSET job id -> due unix ms: arq jobs waiting for their time (`_defer_by`, `Retry`). A
        client moving a due job pushes its score on by a lease, so a mover that dies mid-move
        leaves it to the next (`lua/undefer.lua`)."""
        return f"{self.prefix}cluster:{{{cluster}}}:deferred"

    def cluster_epoch(self, cluster: str) -> str:
        """STRING counter: fencing epochs handed to the cluster's kernel incarnations (in the
        cluster's slot, so `lua/kernel_start.lua` runs in one)."""
        return f"{self.prefix}cluster:{{{cluster}}}:epoch"

    # ------------------------------------------------------------ kernels
    def kernel(self, cluster: str, kernel: str) -> str:
        """HASH: the kernel record (agent, state, epoch, pid, ...)."""
        return f"{self.prefix}kernel:{{{cluster}}}:{kernel}"

    def queue(self, cluster: str, kernel: str) -> str:
        """ZSET job id -> enqueue ms: the kernel's job queue (arq's queue model)."""
        return f"{self.prefix}kernel:{{{cluster}}}:{kernel}:queue"

    def kernel_wake(self, cluster: str, kernel: str) -> str:
        """ZSET with one member, 'w', while jobs may be queued: the token the kernel's idle
        workers block on (BZPOPMIN), each with its claim written behind the pop."""
        return f"{self.prefix}kernel:{{{cluster}}}:{kernel}:wake"

    def inflight(self, cluster: str, kernel: str) -> str:
        """ZSET job id -> enqueue ms: every job routed to the kernel and not finished (queued + running)."""
        return f"{self.prefix}kernel:{{{cluster}}}:{kernel}:inflight"

    def kernel_lease(self, cluster: str, kernel: str) -> str:
        """STRING with a TTL (value: pid), no longer written (a kernel's liveness is its agent's
        lease plus `agent_running`); a leftover from an older agent is deleted with the kernel."""
        return f"{self.prefix}kernel:{{{cluster}}}:{kernel}:lease"

    def kernel_stats(self, cluster: str, kernel: str) -> str:
        """HASH of counters: dispatches, errors, latency_ms_sum."""
        return f"{self.prefix}kernel:{{{cluster}}}:{kernel}:stats"

    def kernel_health(self, cluster: str, kernel: str) -> str:
        """HASH: outlier detection of one kernel as every client sees it (`lua/outlier.lua`):
        consecutive failures, ejections, ejected_until ms, last_ejected ms."""
        return f"{self.prefix}kernel:{{{cluster}}}:{kernel}:health"

    def kernel_pattern(self, cluster: str) -> str:
        """SCAN pattern for every per-kernel key of a cluster."""
        return f"{self.prefix}kernel:{{{cluster}}}:*"

    # ------------------------------------------------------------ jobs
    def job(self, cluster: str, job_id: str) -> str:
        """HASH: one job (arq-serialized JSON under ``job``, routing fields, fencing epoch)."""
        return f"{self.prefix}job:{{{cluster}}}:{job_id}"

    def job_deferred(self, cluster: str, job_id: str) -> str:
        """HASH (`records.DeferredRecord`): a deferred arq job, until a client routes it when due."""
        return f"{self.prefix}job:{{{cluster}}}:{job_id}:deferred"

    def job_result(self, cluster: str, job_id: str) -> str:
        """STRING with a TTL (arq's `keep_result`): the arq-format result of an arq job."""
        return f"{self.prefix}job:{{{cluster}}}:{job_id}:result"

    def job_pattern(self, cluster: str) -> str:
        return f"{self.prefix}job:{{{cluster}}}:*"

    def reply(self, cluster: str, client_id: str) -> str:
        """LIST: results of `cluster`'s jobs pushed to one client process (expires when the client
        goes away). In the cluster's slot, so the scripts that push to it (finish, rebind) and the
        reconciler's fenced write run in one slot with the job; the client's `reply_bell` says
        which of its clusters' lists to take from."""
        return f"{self.prefix}reply:{{{cluster}}}:{client_id}"

    def reply_taken(self, cluster: str, client_id: str) -> str:
        """LIST: results the client's listener took off its `reply` list of `cluster` and is
        delivering (kept until its next take there, so a take whose answer a Redis crash lost
        is read again)."""
        return f"{self.prefix}reply:{{{cluster}}}:{client_id}:taken"

    def reply_bell(self, client_id: str) -> str:
        """ZSET: the client's doorbell, in the client's own slot, so one blocking pop per client
        serves every cluster, wherever their slots live. A kernel that delivered a result adds
        the reply itself (score 0); whoever else pushed to one of its `reply` lists rings it with
        the cluster's name (score: ms), after the push. A hint: the listener also takes, now and
        then, from every cluster it waits on."""
        return f"{self.prefix}reply:{{{client_id}}}:bell"

    def reply_bell_for(self, reply_key: str) -> str | None:
        """The bell to ring after pushing to `reply_key` (a `reply` list read from a job hash);
        None when it is not one (a list of another form, e.g. an older client's
        `reply:{client}`, which that client blocks on itself)."""
        head = f"{self.prefix}reply:{{"
        if not reply_key.startswith(head):
            return None
        cluster, sep, client_id = reply_key[len(head) :].partition("}:")
        if not (sep and cluster and client_id) or "{" in cluster or any(c in client_id for c in ":{}*?["):
            return None
        return self.reply_bell(client_id)

    def reply_pattern(self) -> str:
        """Glob of every reply list, taken list and bell (ACL rules)."""
        return f"{self.prefix}reply:*"

    # ------------------------------------------------------------ agents
    def agents(self) -> str:
        """SET of agent names."""
        return f"{self.prefix}agents"

    def agent(self, agent: str) -> str:
        """HASH: the agent record (host, slots, capabilities, labels)."""
        return f"{self.prefix}agent:{agent}"

    def agent_lease(self, agent: str) -> str:
        """STRING with a TTL (`records.AgentLease`: the beat's Redis-clock ms and the agent's state
        version): present while the agent is alive. Its heartbeat's one command, SET ... PX."""
        return f"{self.prefix}agent:{agent}:lease"

    def agent_running(self, agent: str) -> str:
        """HASH ``cluster/kernel`` -> pid: the kernel processes the agent runs, rewritten only when
        one starts or exits (the agent sees it through the process handle), with a new state
        version in its lease. A kernel is alive while its agent is and it is listed here."""
        return f"{self.prefix}agent:{agent}:running"

    def agent_kernels(self, agent: str) -> str:
        """HASH ``cluster/kernel`` -> ``run`` | ``drain``: the kernels assigned to the agent."""
        return f"{self.prefix}agent:{agent}:kernels"

    def agent_wake(self, agent: str) -> str:
        """LIST the control plane pushes to so the agent re-reads its assignment at once."""
        return f"{self.prefix}agent:{agent}:wake"

    def heartbeats(self) -> str:
        """HASH agent -> unix ms of its last heartbeat, no longer written (the beat's time is in the
        agent's lease); cleared with the agent."""
        return f"{self.prefix}heartbeats"

    def lapsed_agents(self) -> str:
        """HASH with a TTL: agent -> `records.LapsedRecord` JSON of an agent the leader forgot
        because its lease lapsed (not on purpose), so it stays visible as down for a while."""
        return f"{self.prefix}lapsed:agents"

    def lapsed_kernels(self) -> str:
        """HASH with a TTL: ``cluster/kernel`` -> `records.LapsedRecord` JSON of a kernel removed
        because its lease or its agent's lapsed, so it stays visible as down for a while."""
        return f"{self.prefix}lapsed:kernels"

    def load(self, agent: str, cluster: str, kernel: str) -> str:
        """HASH with a TTL (3 x `load_refresh`): the load record of one kernel (`records.LoadRecord`).
        Its agent writes cpu and memory, the kernel process its queue, in-flight count, latency
        and error rate (`kernel_agent/kernel/load_report.py`): each on a change, at most once per
        heartbeat, and the agent at least every `load_refresh` (with the TTL). Never read back.

        Under the agent's key space so a per-agent ACL can allow writing only its own."""
        return f"{self.prefix}agent:{agent}:load:{{{cluster}}}:{kernel}"

    # ------------------------------------------------------------ ClusterMetricsCollector
    def collector_values(self, cluster: str) -> str:
        """HASH ``{kernel}/{metric}`` -> JSON value: what `ClusterMetricsCollector` recorded."""
        return f"{self.prefix}metrics:{{{cluster}}}:values"

    def collector_kernels(self, cluster: str) -> str:
        """ZSET kernel -> unix seconds of its last record/increment (the collector's kernels)."""
        return f"{self.prefix}metrics:{{{cluster}}}:kernels"

    def collector_types(self, cluster: str) -> str:
        """HASH metric -> ``counter`` (only ever incremented) | ``gauge`` (recorded)."""
        return f"{self.prefix}metrics:{{{cluster}}}:types"

    # ------------------------------------------------------------ control plane
    def leader(self) -> str:
        """STRING with a TTL: the token of the leading `kcp serve`."""
        return f"{self.prefix}leader"

    def leader_term(self) -> str:
        """STRING counter: INCR by leader.lua whenever a `kcp serve` takes the lease afresh. Its
        hash tag is the whole leader key, so both share a slot (one script updates both) and
        the name still starts with the prefix (the ACL patterns)."""
        return f"{self.prefix}leader:term:{{{self.prefix}leader}}"

    def service_wake(self) -> str:
        """LIST clients and agents push to so the leader reconciles at once: ``client`` (a cluster
        was created or changed: the leader re-reads the cluster set), ``agent {name}`` (the agent
        registered or stops: the leader re-reads its record). The leader takes the whole list."""
        return f"{self.prefix}service:wake"

    def reliability(self) -> str:
        """HASH of failure-handling counters and the last detection time (see docs/reliability.md)."""
        return f"{self.prefix}reliability"

    def rejections(self) -> str:
        """HASH reason -> count of dispatches a client refused before enqueueing (`stats.REJECTIONS`)."""
        return f"{self.prefix}rejections"

    def notify(self) -> str:
        """Pub/sub channel (not a key): a cluster name is published when its kernels change."""
        return f"{self.prefix}notify"

    # ------------------------------------------------------------ inter-kernel bus
    def bus_topic(self, topic: str) -> str:
        """STREAM of one topic (events, metrics, control, data); one consumer group per subscribed kernel."""
        return f"{self.prefix}bus:topic:{{{topic}}}"

    def bus_inbox(self, kernel: str) -> str:
        """STREAM of direct messages to one kernel; its one consumer group is named after the kernel."""
        return f"{self.prefix}bus:inbox:{{{kernel}}}"

    def bus_seq(self, stream: str) -> str:
        """STRING counter: the last sequence number given to an entry of `stream` (a bus stream key)."""
        return f"{stream}:seq"

    def bus_gaps(self, stream: str) -> str:
        """HASH of `stream`'s hard-cap counters (`bus_trim.lua`, in the stream's slot):
        `gaps:{label}:{group}` entries a group lost unread, `:seen` what its consumer logged,
        `capped:{label}` entries the cap removed."""
        return f"{stream}:gaps"

    def bus_subscribers(self, topic: str) -> str:
        """SET of the kernels subscribed to a topic (their groups on the topic stream)."""
        return f"{self.prefix}bus:topic:{{{topic}}}:subscribers"

    def bus_kernels(self) -> str:
        """HASH kernel -> JSON {host, pid, registered_at}: kernels registered on the bus (the
        list `get_stats()` reads; `bus_publish.lua` checks the kernel's inbox instead)."""
        return f"{self.prefix}bus:kernels"

    def bus_lease(self, kernel: str) -> str:
        """STRING with a TTL: present while a bus process serves the kernel."""
        return f"{self.prefix}bus:kernel:{{{kernel}}}:lease"

    def bus_dead(self) -> str:
        """STREAM of dead letters: entries given up after too many deliveries, with the reason."""
        return f"{self.prefix}bus:dead"

    def bus_stats(self) -> str:
        """HASH of fleet-wide counters: dead:{stream kind} (the cap's gaps are per stream: `bus_gaps`)."""
        return f"{self.prefix}bus:stats"
