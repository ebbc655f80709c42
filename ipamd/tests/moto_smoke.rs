//! Smoke run of the daemon against moto's EC2 server in secondary-IP mode: the real SDK client
//! talks HTTP to moto (instance metadata comes from an in-memory instance built from moto's
//! answers, as moto has none). moto is wrong about limits and address uniqueness (see the
//! simulator's README), so this only checks that the daemon boots, grows its pool through
//! moto's `CreateNetworkInterface`/`AttachNetworkInterface`/`AssignPrivateIpAddresses`, and
//! serves and releases addresses that moto agrees are on the instance's ENIs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use ipamd::config::Config;
use ipamd::daemon::{self, Deps};
use ipamd::io::ec2::aws::AwsEc2;
use ipamd::io::imds::{FakeImds, Identity, ImdsEni};
use vpc_cni_rpc::{AddNetworkRequest, DelNetworkRequest};
use vpc_sim::moto::MotoServer;

const REGION: &str = "us-west-2";

fn sdk(url: &str) -> aws_sdk_ec2::Client {
    let conf = aws_sdk_ec2::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(url)
        .credentials_provider(Credentials::new("AKIDTEST", "secret", None, None, "static"))
        .build();
    aws_sdk_ec2::Client::from_conf(conf)
}

/// The addresses moto holds on the instance's ENIs (primary addresses excluded).
async fn moto_secondary_ips(c: &aws_sdk_ec2::Client, instance: &str) -> BTreeSet<String> {
    let out = c
        .describe_network_interfaces()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("attachment.instance-id")
                .values(instance)
                .build(),
        )
        .send()
        .await
        .unwrap();
    out.network_interfaces()
        .iter()
        .flat_map(|e| e.private_ip_addresses())
        .filter(|a| a.primary() != Some(true))
        .filter_map(|a| a.private_ip_address().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_boots_grows_and_serves_on_moto_in_secondary_ip_mode() {
    let Some(moto) = MotoServer::for_test("ipamd moto smoke run") else {
        return;
    };
    let c = sdk(moto.url());
    let vpc = c
        .create_vpc()
        .cidr_block("10.0.0.0/16")
        .send()
        .await
        .unwrap();
    let vpc_id = vpc.vpc().unwrap().vpc_id().unwrap().to_owned();
    let az = format!("{REGION}a");
    let subnet = c
        .create_subnet()
        .vpc_id(&vpc_id)
        .cidr_block("10.0.0.0/20")
        .availability_zone(&az)
        .send()
        .await
        .unwrap();
    let subnet_id = subnet.subnet().unwrap().subnet_id().unwrap().to_owned();
    let run = c
        .run_instances()
        .image_id("ami-12c6146b")
        .instance_type(aws_sdk_ec2::types::InstanceType::M5Large)
        .subnet_id(&subnet_id)
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .unwrap();
    let inst = &run.instances()[0];
    let instance_id = inst.instance_id().unwrap().to_owned();
    let eni = &inst.network_interfaces()[0];
    let mac = eni.mac_address().unwrap().to_lowercase();
    let primary_ip: std::net::Ipv4Addr = eni.private_ip_address().unwrap().parse().unwrap();
    let identity = Identity {
        instance_id: instance_id.clone(),
        instance_type: "m5.large".into(),
        region: REGION.into(),
        availability_zone: az,
        primary_mac: mac.clone(),
        local_ipv4: primary_ip,
    };
    let imds = FakeImds::new(
        identity,
        vec![ImdsEni {
            mac,
            interface_id: eni.network_interface_id().unwrap().to_owned(),
            device_number: 0,
            network_card: 0,
            subnet_id,
            subnet_cidr: "10.0.0.0/20".parse().unwrap(),
            vpc_id,
            vpc_cidrs: vec!["10.0.0.0/16".parse().unwrap()],
            security_groups: eni
                .groups()
                .iter()
                .filter_map(|g| g.group_id().map(str::to_owned))
                .collect(),
            local_ipv4s: vec![primary_ip],
            ipv4_prefixes: vec![],
        }],
    );
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ipamd.sock").display().to_string();
    let store = dir.path().join("ipam.json").display().to_string();
    let cfg = Config::for_test(&[
        ("IPAMD_GRPC_SOCKET", &sock),
        ("AWS_VPC_K8S_CNI_BACKING_STORE", &store),
        ("METRICS_BIND_ADDRESS", "127.0.0.1:0"),
        ("INTROSPECTION_BIND_ADDRESS", "127.0.0.1:0"),
        ("AWS_EC2_ENDPOINT", moto.url()),
        ("VPC_CNI_POOL_TICK", "100ms"),
        ("WARM_IP_TARGET", "4"),
        ("MINIMUM_IP_TARGET", "12"),
        // moto's IMDS-less world: nothing for reconcile to compare with in this short run.
        ("VPC_CNI_RECONCILE_INTERVAL", "1h"),
        ("DISABLE_LEAKED_ENI_CLEANUP", "true"),
    ])
    .unwrap();
    let d = daemon::start(
        &cfg,
        Deps {
            ec2: Arc::new(AwsEc2::from_client(c.clone())),
            imds: Arc::new(imds),
            veths: Arc::new(ipamd::daemon::AllVethsPresent),
        },
    )
    .await
    .expect("start-up on moto");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while d.pool().is_low() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pool did not reach MINIMUM_IP_TARGET on moto"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = vpc_cni_rpc::connect_unix(&cfg.grpc_socket, Duration::from_secs(5))
        .await
        .unwrap();
    let on_moto = moto_secondary_ips(&c, &instance_id).await;
    let mut got = BTreeSet::new();
    for i in 0..6 {
        let r = client
            .add_network(AddNetworkRequest {
                client_version: env!("CARGO_PKG_VERSION").into(),
                k8s_pod_name: format!("p{i}"),
                k8s_pod_namespace: "default".into(),
                container_id: format!("c{i}"),
                if_name: "eth0".into(),
                network_name: "aws-cni".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.success, "AddNetwork {i}: {r:?}");
        let ip = r.ip_allocation_metadata[0].i_pv4_addr.clone();
        assert!(
            on_moto.contains(&ip),
            "{ip} is not on the instance in moto: {on_moto:?}"
        );
        assert!(got.insert(ip.clone()), "{ip} handed out twice");
    }
    for i in 0..6 {
        let r = client
            .del_network(DelNetworkRequest {
                client_version: env!("CARGO_PKG_VERSION").into(),
                container_id: format!("c{i}"),
                if_name: "eth0".into(),
                network_name: "aws-cni".into(),
                reason: "PodDeleted".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.success, "DelNetwork {i}: {r:?}");
    }
    assert_eq!(d.state().lock().totals().assigned, 0);
    d.stop().await;
}
