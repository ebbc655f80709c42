//! Network cards through the real `aws-sdk-ec2` client and aws-config's IMDS client: per-card
//! ENI limits from the instance table, `NetworkCardIndex` on attach with EC2's errors, device
//! indexes per card, and the card in Describe answers, metadata and hooks.
#![allow(clippy::unwrap_used)]

mod common;

use aws_sdk_ec2::types::{Filter, InstanceType};
use common::{client, code, fixture, serve};
use vpc_sim::hooks::{HookEvent, Recorder};
use vpc_sim::sim::SimConfig;

fn filter(name: &str, value: &str) -> Filter {
    Filter::builder().name(name).values(value).build()
}

async fn new_eni(c: &aws_sdk_ec2::Client, subnet: &str) -> String {
    c.create_network_interface()
        .subnet_id(subnet)
        .send()
        .await
        .unwrap()
        .network_interface()
        .unwrap()
        .network_interface_id()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn describe_instance_types_lists_every_card_with_its_own_limit() {
    let (_shared, srv) = serve(SimConfig::default()).await;
    let c = client(&srv.ec2_url());
    let t = c
        .describe_instance_types()
        .instance_types(InstanceType::from("p5.48xlarge"))
        .instance_types(InstanceType::from("i7ie.48xlarge"))
        .instance_types(InstanceType::from("m5.large"))
        .send()
        .await
        .unwrap();
    let info = |name: &str| {
        t.instance_types()
            .iter()
            .find(|i| i.instance_type().map(|t| t.as_str()) == Some(name))
            .and_then(|i| i.network_info())
            .unwrap()
            .clone()
    };
    let p5 = info("p5.48xlarge");
    assert_eq!(p5.maximum_network_cards(), Some(32));
    assert_eq!(p5.default_network_card_index(), Some(0));
    assert_eq!(p5.maximum_network_interfaces(), Some(64));
    assert_eq!(p5.network_cards().len(), 32);
    for (i, card) in p5.network_cards().iter().enumerate() {
        assert_eq!(card.network_card_index(), Some(i as i32));
        assert_eq!(card.maximum_network_interfaces(), Some(2));
    }
    // The cards of one type may differ: i7ie.48xlarge has 8 ENIs on card 0 and 7 on card 1.
    let i7ie = info("i7ie.48xlarge");
    let limits: Vec<_> = i7ie
        .network_cards()
        .iter()
        .map(|c| (c.network_card_index(), c.maximum_network_interfaces()))
        .collect();
    assert_eq!(limits, vec![(Some(0), Some(8)), (Some(1), Some(7))]);
    assert_eq!(i7ie.maximum_network_interfaces(), Some(15));
    let m5 = info("m5.large");
    assert_eq!(
        (m5.maximum_network_cards(), m5.network_cards().len()),
        (Some(1), 1)
    );
    srv.shutdown();
}

#[tokio::test]
async fn attach_takes_a_network_card_with_its_own_device_indexes_and_limit() {
    let (shared, srv) = serve(SimConfig {
        imds_delay_ms: 0,
        ..Default::default()
    })
    .await;
    let rec = Recorder::new();
    shared.with(|s| s.set_hooks(Box::new(rec.clone())));
    let c = client(&srv.ec2_url());
    let f = fixture(&c, "10.0.0.0/24", "p5.48xlarge").await;

    // RunInstances put the primary ENI on the default card at device 0.
    let d = c
        .describe_instances()
        .instance_ids(&f.instance)
        .send()
        .await
        .unwrap();
    let inst = &d.reservations()[0].instances()[0];
    let primary = inst.network_interfaces()[0].attachment().unwrap();
    assert_eq!(
        (primary.network_card_index(), primary.device_index()),
        (Some(0), Some(0))
    );

    // Device 0 is taken on card 0 but free on card 1: device indexes are per card.
    let on_card1 = new_eni(&c, &f.subnet).await;
    let a = c
        .attach_network_interface()
        .network_interface_id(&on_card1)
        .instance_id(&f.instance)
        .device_index(0)
        .network_card_index(1)
        .send()
        .await
        .unwrap();
    assert_eq!(a.network_card_index(), Some(1));
    let second_on_card1 = new_eni(&c, &f.subnet).await;
    c.attach_network_interface()
        .network_interface_id(&second_on_card1)
        .instance_id(&f.instance)
        .device_index(1)
        .network_card_index(1)
        .send()
        .await
        .unwrap();

    // The same device index twice on one card is refused.
    let spare = new_eni(&c, &f.subnet).await;
    let e = c
        .attach_network_interface()
        .network_interface_id(&spare)
        .instance_id(&f.instance)
        .device_index(0)
        .network_card_index(1)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidParameterValue");
    assert!(
        e.as_service_error()
            .and_then(|s| aws_sdk_ec2::error::ProvideErrorMetadata::message(s))
            .is_some_and(|m| m.contains("device index '0'")),
        "{e:?}"
    );

    // Card 1 holds two ENIs: a third is over its limit though the instance has 61 slots left.
    let e = c
        .attach_network_interface()
        .network_interface_id(&spare)
        .instance_id(&f.instance)
        .device_index(2)
        .network_card_index(1)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "AttachmentLimitExceeded");
    assert!(
        e.as_service_error()
            .and_then(|s| aws_sdk_ec2::error::ProvideErrorMetadata::message(s))
            .is_some_and(|m| m.contains("exceeds the limit for p5.48xlarge")),
        "{e:?}"
    );

    // p5.48xlarge has cards 0 to 31: card 32 does not exist.
    let e = c
        .attach_network_interface()
        .network_interface_id(&spare)
        .instance_id(&f.instance)
        .device_index(0)
        .network_card_index(32)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidParameterValue");
    assert!(
        e.as_service_error()
            .and_then(|s| aws_sdk_ec2::error::ProvideErrorMetadata::message(s))
            .is_some_and(|m| m.contains("NetworkCardIndex") && m.contains("0 to 31")),
        "{e:?}"
    );

    // Without NetworkCardIndex the default card is meant: device 1 fits there, device 2 not.
    c.attach_network_interface()
        .network_interface_id(&spare)
        .instance_id(&f.instance)
        .device_index(1)
        .send()
        .await
        .unwrap();
    let last = new_eni(&c, &f.subnet).await;
    let e = c
        .attach_network_interface()
        .network_interface_id(&last)
        .instance_id(&f.instance)
        .device_index(2)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "AttachmentLimitExceeded");
    // The last card takes it.
    c.attach_network_interface()
        .network_interface_id(&last)
        .instance_id(&f.instance)
        .device_index(0)
        .network_card_index(31)
        .send()
        .await
        .unwrap();

    // DescribeNetworkInterfaces carries the card, and filters on it.
    let d = c
        .describe_network_interfaces()
        .filters(filter("attachment.instance-id", &f.instance))
        .filters(filter("attachment.network-card-index", "1"))
        .send()
        .await
        .unwrap();
    let mut ids: Vec<_> = d
        .network_interfaces()
        .iter()
        .map(|e| {
            let a = e.attachment().unwrap();
            assert_eq!(a.network_card_index(), Some(1));
            (a.device_index().unwrap(), e.network_interface_id().unwrap())
        })
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        vec![(0, on_card1.as_str()), (1, second_on_card1.as_str())]
    );

    // DescribeInstances lists every ENI with its card.
    let d = c
        .describe_instances()
        .instance_ids(&f.instance)
        .send()
        .await
        .unwrap();
    let mut slots: Vec<_> = d.reservations()[0].instances()[0]
        .network_interfaces()
        .iter()
        .map(|n| {
            let a = n.attachment().unwrap();
            (a.network_card_index().unwrap(), a.device_index().unwrap())
        })
        .collect();
    slots.sort_unstable();
    assert_eq!(slots, vec![(0, 0), (0, 1), (1, 0), (1, 1), (31, 0)]);

    // IMDS: network-card per MAC, next to the per-card device-number.
    let macs = d.reservations()[0].instances()[0]
        .network_interfaces()
        .iter()
        .map(|n| {
            let a = n.attachment().unwrap();
            (
                n.mac_address().unwrap().to_owned(),
                a.network_card_index().unwrap(),
                a.device_index().unwrap(),
            )
        })
        .collect::<Vec<_>>();
    let imds = aws_config::imds::Client::builder()
        .endpoint(srv.imds_url(&f.instance))
        .unwrap()
        .build();
    for (mac, card, device) in &macs {
        let base = format!("/latest/meta-data/network/interfaces/macs/{mac}");
        let listing = String::from(imds.get(format!("{base}/")).await.unwrap());
        assert!(listing.lines().any(|l| l == "network-card"), "{listing}");
        assert_eq!(
            String::from(imds.get(format!("{base}/network-card")).await.unwrap()),
            card.to_string()
        );
        assert_eq!(
            String::from(imds.get(format!("{base}/device-number")).await.unwrap()),
            device.to_string()
        );
    }

    // The hooks name the card each ENI went to, so a harness plugs it in the right place.
    let attached: Vec<_> = rec
        .events()
        .into_iter()
        .filter_map(|e| match e {
            HookEvent::Attached(a) if a.instance_id == f.instance => {
                Some((a.eni_id, a.network_card_index, a.device_index))
            }
            _ => None,
        })
        .collect();
    assert!(attached.contains(&(on_card1.clone(), 1, 0)), "{attached:?}");
    assert!(attached.contains(&(second_on_card1, 1, 1)), "{attached:?}");
    assert!(attached.contains(&(spare, 0, 1)), "{attached:?}");
    assert!(attached.contains(&(last, 31, 0)), "{attached:?}");
    srv.shutdown();
}
