// A gRPC client built with grpc-go from Debian's golang-google-grpc-dev (GOPATH mode), dialling
// ipamd the way the reference CNI plugin does: grpc.Dial("unix://<path>", insecure), no
// WithBlock, no deadline on the calls. Used by ipamd/tests/grpc_clients.rs.
//
// Usage: go_client <socket path> <client version> <container id>
// Prints one line per call: "add ok <success> <ipv4>", "del ok <success>",
// "npconfig ok <mode> <node ip>" (the network policy agent's call), "health <status>",
// or "<call> err <code> <message>"; exits 0 once every call has been attempted.
package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"vpccnitest/rpc"
)

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: go_client <socket> <client version> <container id>")
		os.Exit(2)
	}
	sock, version, container := os.Args[1], os.Args[2], os.Args[3]
	conn, err := grpc.Dial("unix://"+sock, grpc.WithInsecure())
	if err != nil {
		fmt.Println("dial err", err)
		os.Exit(1)
	}
	defer conn.Close()
	ctx := context.Background()
	c := rpc.NewCNIBackendClient(conn)

	// Retried (at most 30 s) while ipamd answers Success=false: its warm pool is filling.
	var add *rpc.AddNetworkReply
	deadline := time.Now().Add(30 * time.Second)
	for {
		add, err = c.AddNetwork(ctx, &rpc.AddNetworkRequest{
			ClientVersion: version, K8S_POD_NAME: "go-pod", K8S_POD_NAMESPACE: "default",
			K8S_POD_INFRA_CONTAINER_ID: container, ContainerID: container,
			Netns: "/var/run/netns/go", IfName: "eth0", NetworkName: "aws-cni",
		})
		if err != nil || add.Success || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil {
		st := status.Convert(err)
		fmt.Printf("add err %s %q\n", st.Code(), st.Message())
	} else {
		ip := ""
		for _, m := range add.IPAllocationMetadata {
			ip = m.IPv4Addr
		}
		fmt.Printf("add ok %t %s\n", add.Success, ip)
	}

	del, err := c.DelNetwork(ctx, &rpc.DelNetworkRequest{
		ClientVersion: version, K8S_POD_NAME: "go-pod", K8S_POD_NAMESPACE: "default",
		K8S_POD_INFRA_CONTAINER_ID: container, ContainerID: container,
		IfName: "eth0", NetworkName: "aws-cni", Reason: "PodDeleted",
	})
	if err != nil {
		st := status.Convert(err)
		fmt.Printf("del err %s %q\n", st.Code(), st.Message())
	} else {
		fmt.Printf("del ok %t\n", del.Success)
	}

	// What the network policy agent asks ipamd on the same socket.
	np, err := rpc.NewConfigServerBackendClient(conn).GetNetworkPolicyConfigs(ctx, &emptypb.Empty{})
	if err != nil {
		st := status.Convert(err)
		fmt.Printf("npconfig err %s %q\n", st.Code(), st.Message())
	} else {
		fmt.Printf("npconfig ok %q %s\n", np.NetworkPolicyMode, np.NodeIPv4)
	}

	h, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		st := status.Convert(err)
		fmt.Printf("health err %s %q\n", st.Code(), st.Message())
	} else {
		fmt.Printf("health %s\n", h.Status)
	}
}
