//! Each CDR format, chosen per topic, through the whole path.

use crate::helpers::*;

const CALLED: &str = "0312345678";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asterisk_and_freeswitch_topics_are_decoded_and_notified() {
    let h = Harness::new(1).await;
    let engine = h.engine().await;
    engine.provision(&[plain_subscriber(CALLED, "taro@example.jp")]);

    // Asterisk writes the exchange's local time (Japan) without an offset; FreeSWITCH
    // epoch seconds, here of a call an hour earlier.
    let start = call_start();
    let local = |secs| (start + chrono::TimeDelta::seconds(secs)).format("%Y-%m-%d %H:%M:%S").to_string();
    let fs_start = start - chrono::TimeDelta::hours(1);
    let epoch = |secs: i64| (fs_start.timestamp() + secs).to_string();
    let asterisk = serde_json::json!({
        "accountcode": "", "src": "09011112222", "dst": CALLED, "dcontext": "from-trunk",
        "clid": "\"Yamada\" <09011112222>", "channel": "PJSIP/trunk-00000001", "dstchannel": "",
        "lastapp": "Dial", "lastdata": "PJSIP/1001,30", "start": local(0),
        "answer": "", "end": local(31), "duration": 31, "billsec": 0,
        "disposition": "NO ANSWER", "amaflags": "DOCUMENTATION",
        "uniqueid": "1764000000.1", "linkedid": "1764000000.1", "userfield": "", "sequence": 1
    });
    let freeswitch = serde_json::json!({
        "core-uuid": "3b1f8c2e",
        "switchname": "fs01",
        "channel_data": {"state": "CS_REPORTING", "direction": "inbound"},
        "variables": {
            "uuid": "6f1c9d3a-0000-4000-8000-000000000001",
            "caller_id_number": "0612345678",
            "destination_number": CALLED,
            "start_epoch": epoch(0),
            "answer_epoch": epoch(5),
            "end_epoch": epoch(31),
            "hangup_cause": "NORMAL_CLEARING"
        }
    });
    h.produce(ASTERISK_TOPIC, &[asterisk.to_string()]).await;
    h.produce(FREESWITCH_TOPIC, &[freeswitch.to_string()]).await;
    let mails = h.mails(2).await;
    let bodies: Vec<String> = mails.iter().map(|m| parse(m).body).collect();
    let missed = bodies.iter().find(|b| b.contains("09011112222")).expect("asterisk call notified");
    assert!(missed.contains(&jst_line(start)), "{missed}");
    assert!(missed.contains("応答できませんでした"));
    let answered = bodies.iter().find(|b| b.contains("0612345678")).expect("freeswitch call notified");
    assert!(answered.contains(&jst_line(fs_start)), "{answered}");
    assert!(answered.contains("応答しました"));
    engine.stop().await;
}
