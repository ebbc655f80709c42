"""A gRPC client built with Python's grpcio from the reference proto, with grpcio's default
channel options, dialling ipamd's unix socket. Used by ipamd/tests/grpc_clients.rs.

Usage: grpcio_client.py <stubs dir> <socket path> <client version> <container id>
Prints one line per call: "add ok <success> <ipv4>", "del ok <success>", "health <status>",
or "<call> err <code> <details>". AddNetwork is retried (at most 30 s) while ipamd answers
Success=false because its warm pool is still filling.
"""
import sys
import time

sys.path.insert(0, sys.argv[1])
import grpc  # noqa: E402
import health_pb2  # noqa: E402
import health_pb2_grpc  # noqa: E402
import rpc_pb2  # noqa: E402
import rpc_pb2_grpc  # noqa: E402

sock, version, container = sys.argv[2], sys.argv[3], sys.argv[4]
channel = grpc.insecure_channel("unix:" + sock)  # default options: no default_authority
cni = rpc_pb2_grpc.CNIBackendStub(channel)


def err(call, e):
    print(f"{call} err {e.code().name} {e.details()!r}", flush=True)


deadline = time.monotonic() + 30
while True:
    try:
        add = cni.AddNetwork(
            rpc_pb2.AddNetworkRequest(
                ClientVersion=version, K8S_POD_NAME="py-pod", K8S_POD_NAMESPACE="default",
                K8S_POD_INFRA_CONTAINER_ID=container, ContainerID=container,
                Netns="/var/run/netns/py", IfName="eth0", NetworkName="aws-cni"),
            timeout=10)
    except grpc.RpcError as e:
        err("add", e)
        break
    if add.Success or time.monotonic() > deadline:
        ip = add.IPAllocationMetadata[0].IPv4Addr if add.IPAllocationMetadata else ""
        print(f"add ok {str(add.Success).lower()} {ip}", flush=True)
        break
    time.sleep(0.2)

try:
    d = cni.DelNetwork(
        rpc_pb2.DelNetworkRequest(
            ClientVersion=version, K8S_POD_NAME="py-pod", K8S_POD_NAMESPACE="default",
            K8S_POD_INFRA_CONTAINER_ID=container, ContainerID=container,
            IfName="eth0", NetworkName="aws-cni", Reason="PodDeleted"),
        timeout=10)
    print(f"del ok {str(d.Success).lower()}", flush=True)
except grpc.RpcError as e:
    err("del", e)

try:
    h = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    print(f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(h.status)}", flush=True)
except grpc.RpcError as e:
    err("health", e)
