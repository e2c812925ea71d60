//! Acknowledged writes survive restarts, SIGKILL and SIGTERM.

mod common;

use std::time::Duration;

use common::Server;
use serde_json::json;

#[test]
fn entries_survive_a_restart_without_re_embedding() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let (a, b);
    {
        let s = Server::start_in(&dir, &[]);
        a = s.set(
            "c",
            "What is the boiling point of water?",
            "100 C",
            json!({"lang": "en"}),
        );
        b = s.set("d", "How tall is Mount Everest?", "8849 m", json!({}));
    }
    let s = Server::start_in(&dir, &[]);
    let hits = s.search(
        "c",
        json!({"prompt": "what is the boiling point of water?", "attributes": {"lang": "en"}}),
    );
    assert_eq!(hits[0]["id"], a.as_str());
    assert_eq!(hits[0]["searchStrategy"], "exact");
    let hits = s.search(
        "d",
        json!({"prompt": "What is the height of Mount Everest?", "similarityThreshold": 0.8}),
    );
    assert_eq!(hits[0]["id"], b.as_str());
    assert_eq!(hits[0]["searchStrategy"], "semantic");
}

#[test]
fn acknowledged_inserts_survive_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut acknowledged = Vec::new();
    {
        let s = Server::start_in(&dir, &[]);
        for i in 0..40 {
            let prompt = format!("Question number {i}: what is {i} times {}?", i + 3);
            let id = s.set(
                "crash",
                &prompt,
                &format!("{}", i * (i + 3)),
                json!({"n": i.to_string()}),
            );
            acknowledged.push((prompt, id));
        }
        s.signal("KILL");
        // Drop reaps the killed process.
    }
    let s = Server::start_in(&dir, &[]);
    for (prompt, id) in &acknowledged {
        let hits = s.search(
            "crash",
            json!({"prompt": prompt, "searchStrategies": ["exact"]}),
        );
        assert_eq!(hits.len(), 1, "lost {prompt}");
        assert_eq!(&hits[0]["id"], id.as_str());
    }
    // The index was rebuilt too: every entry is found by meaning.
    let hits = s.search("crash", json!({"prompt": "Question number 7: what is 7 times 10?", "searchStrategies": ["semantic"]}));
    assert_eq!(hits[0]["id"], acknowledged[7].1.as_str());
}

#[test]
fn sigterm_drains_flushes_and_exits_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let id;
    {
        let mut s = Server::start_in(&dir, &[]);
        id = s.set("c", "Name a prime number", "7", json!({}));
        s.signal("TERM");
        assert_eq!(s.wait_exit(Duration::from_secs(30)), Some(0));
    }
    let s = Server::start_in(&dir, &[]);
    assert_eq!(
        s.search("c", json!({"prompt": "Name a prime number"}))[0]["id"],
        id.as_str()
    );
}

#[test]
fn a_second_server_on_the_same_data_dir_is_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let _first = Server::start_in(&dir, &[]);
    let out = std::process::Command::new(common::BIN)
        .args(["serve", "--addr", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("locked"), "{stderr}");
}

fn startup_entries(s: &Server, source: &str) -> u64 {
    let text = s.get("/metrics").text().unwrap();
    let prefix = format!("semcache_startup_entries{{source=\"{source}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} in /metrics"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn saved_indexes_load_on_restart_and_later_writes_are_not_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let prompts: Vec<String> = (0..30)
        .map(|i| format!("How do I configure feature number {i} of the gateway?"))
        .collect();
    let mut ids = Vec::new();
    {
        let mut s = Server::start_in(&dir, &[]);
        for p in &prompts[..20] {
            ids.push(s.set("saved", p, "answer", json!({})));
        }
        s.signal("TERM");
        assert_eq!(s.wait_exit(Duration::from_secs(60)), Some(0));
    }
    assert!(
        dir.join("indexes").read_dir().unwrap().count() == 1,
        "graph saved at shutdown"
    );
    {
        let s = Server::start_in(&dir, &[]);
        assert_eq!(startup_entries(&s, "saved_index"), 20);
        assert_eq!(startup_entries(&s, "reinserted"), 0);
        // Written after the save, deleted after the save: then a crash.
        for p in &prompts[20..] {
            ids.push(s.set("saved", p, "answer", json!({})));
        }
        assert_eq!(
            s.delete(&format!("/v1/caches/saved/entries/{}", ids[0]), None)
                .status(),
            204
        );
        s.signal("KILL");
    }
    let s = Server::start_in(&dir, &[]);
    assert_eq!(startup_entries(&s, "saved_index"), 19);
    assert_eq!(startup_entries(&s, "reinserted"), 10);
    for (i, (p, id)) in prompts.iter().zip(&ids).enumerate() {
        let hits = s.search(
            "saved",
            json!({"prompt": p, "searchStrategies": ["semantic"]}),
        );
        if i == 0 {
            assert!(
                hits.iter().all(|h| h["id"] != id.as_str()),
                "deleted entry came back"
            );
        } else {
            assert_eq!(&hits[0]["id"], id.as_str(), "{p}");
        }
    }
}

#[test]
fn a_damaged_saved_index_is_rebuilt_from_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let id;
    {
        let mut s = Server::start_in(&dir, &[]);
        id = s.set("c", "What is the capital of Peru?", "Lima", json!({}));
        s.signal("TERM");
        assert_eq!(s.wait_exit(Duration::from_secs(60)), Some(0));
    }
    // One flipped bit in the middle of each frozen segment (its slot map intact): the
    // segment's checksum catches it.
    let mut segments = 0;
    for cache in dir.join("indexes").read_dir().unwrap() {
        for save in cache.unwrap().path().read_dir().unwrap() {
            for file in save.unwrap().path().read_dir().unwrap() {
                let path = file.unwrap().path();
                if path.extension().is_some_and(|e| e == "seg") {
                    let mut bytes = std::fs::read(&path).unwrap();
                    let middle = bytes.len() / 2;
                    bytes[middle] ^= 0x10;
                    std::fs::write(&path, bytes).unwrap();
                    segments += 1;
                }
            }
        }
    }
    assert_eq!(segments, 1, "one cache, one segment");
    let s = Server::start_in(&dir, &[]);
    assert_eq!(startup_entries(&s, "saved_index"), 0);
    assert_eq!(startup_entries(&s, "reinserted"), 1);
    let hits = s.search("c", json!({"prompt": "Which city is the capital of Peru?", "searchStrategies": ["semantic"], "similarityThreshold": 0.8}));
    assert_eq!(hits[0]["id"], id.as_str());
}
