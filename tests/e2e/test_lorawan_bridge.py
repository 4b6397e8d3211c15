"""LoRaWAN bridge: uplinks from a network server's broker (a real Mosquitto) become readings of
the registered devices.

ChirpStack v4 events are built with ChirpStack's own classes (the `chirpstack-api` package) and
published as binary protobuf and as protobuf's JSON mapping; The Things Stack v3 events follow
the documented uplink example. Everything is published with paho-mqtt, QoS 1, as a network server
does.
"""

from __future__ import annotations

import json

import pytest
from cayennelpp import LppFrame

from support import by_quantity, now_ms, unique_id, wait_until
from support.lorawan import (as_json, chirpstack_topic, chirpstack_uplink, lorawan_toml,
                             new_dev_eui, tts_topic, tts_uplink, wait_bridge_connected,
                             wait_readings)


@pytest.fixture
def bridge(brokers, gateway_factory):
    """A Mosquitto broker, a gateway bridging it as ChirpStack v4 (tenant hanoi), a publisher."""
    broker = brokers.mosquitto()
    gw = gateway_factory(config_toml=lorawan_toml(broker, tenant="hanoi"))
    wait_bridge_connected(gw)
    return broker, gw, brokers.publisher(broker)


def lpp(*adds) -> bytes:
    f = LppFrame()
    for name, args in adds:
        getattr(f, name)(*args)
    return bytes(f)


def one(rs: dict[str, list[dict]], quantity: str) -> dict:
    assert quantity in rs, f"no {quantity} reading; have {sorted(rs)}"
    assert len(rs[quantity]) == 1, rs[quantity]
    return rs[quantity][0]


@pytest.mark.parametrize("marshaler", ["protobuf", "json"])
def test_chirpstack_uplink_with_lpp_payload(bridge, marshaler):
    broker, gw, ns = bridge
    eui = new_dev_eui()
    dev = gw.add_device(kind="water_level", dev_eui=eui.upper(), codec="lpp")
    assert dev.record["dev_eui"] == eui and dev.record["codec"] == "lpp"
    t = now_ms() - 60_000
    data = lpp(("add_temperature", (1, 27.5)), ("add_humidity", (2, 61.5)),
               ("add_gps", (3, 21.0285, 105.8542, 12.5)))
    up = chirpstack_uplink(eui, f_cnt=42, time_ms=t, data=data, f_port=2, dr=3,
                           gateways=[(-97, -3.25), (-71, 6.5), (-110, -12.0)], sf=9,
                           frequency=923_400_000)
    ns.publish(chirpstack_topic(eui), up.SerializeToString() if marshaler == "protobuf" else as_json(up))

    rs = wait_readings(gw, dev, 9)
    temp, hum = one(rs, "temperature"), one(rs, "humidity")
    assert (temp["value"], temp["unit"]) == (27.5, "Cel")
    assert (hum["value"], hum["unit"]) == (61.5, "%RH")
    for r in (temp, hum):
        assert r["location"] == {"lat": 21.0285, "lon": 105.8542, "alt_m": 12.5}
    # Radio metadata: best RSSI and SNR over the three gateways.
    expect = {"rssi": (-71, "dBm"), "snr": (6.5, "dB"), "spreading_factor": (9, ""),
              "data_rate": (3, ""), "radio_frequency": (923_400_000, "Hz"), "frame_counter": (42, ""),
              "gateway_count": (3, "count")}
    for q, (value, unit) in expect.items():
        r = one(rs, q)
        assert (r["value"], r["unit"]) == (value, unit), r
    for r in sum(rs.values(), []):
        assert r["protocol"] == "lorawan"
        assert r["device_time_ms"] == t, "readings carry the network server's time"
        assert r["device_seq"] == 42
        assert r["kind"] == "water_level" and r["tenant"] == "hanoi"
    assert gw.metric("citygw_lorawan_messages_total", server="ns1", event="up", outcome="stored") >= 1


def test_chirpstack_decoded_object_join_status_and_log(bridge):
    from chirpstack_api import integration

    broker, gw, ns = bridge
    eui = new_dev_eui()
    dev = gw.add_device(kind="soil_moisture", dev_eui=eui)
    t = now_ms() - 30_000
    # The device profile's codec decoded the payload: its object is used (no codec on the device).
    up = chirpstack_uplink(eui, f_cnt=7, time_ms=t, data=b"\x01\x02",
                           obj={"soil": {"moisture": 31.5}, "valve_open": True,
                                "location": {"latitude": 10.77, "longitude": 106.7}})
    ns.publish(chirpstack_topic(eui), as_json(up))

    join = integration.JoinEvent(dev_addr="00aabbcc")
    join.device_info.dev_eui = eui
    join.time.FromMilliseconds(t - 1000)
    ns.publish(chirpstack_topic(eui, "join"), join.SerializeToString())

    status = integration.StatusEvent(margin=12, battery_level=87.5, external_power_source=False)
    status.device_info.dev_eui = eui
    status.time.FromMilliseconds(t + 1000)
    ns.publish(chirpstack_topic(eui, "status"), as_json(status))

    log = integration.LogEvent(level=integration.ERROR, code=integration.UPLINK_CODEC,
                               description="js codec: ReferenceError")
    log.device_info.dev_eui = eui
    log.time.FromMilliseconds(t + 2000)
    ns.publish(chirpstack_topic(eui, "log"), log.SerializeToString())

    # A downlink report naming none of our commands (someone else's downlink) is counted and
    # acknowledged; it is no reading.
    before = gw.metric("citygw_lorawan_messages_total", server="ns1", outcome="report")
    txack = integration.TxAckEvent(downlink_id=5)
    txack.device_info.dev_eui = eui
    ns.publish(chirpstack_topic(eui, "txack"), txack.SerializeToString())

    rs = wait_readings(gw, dev, 14)
    moisture = one(rs, "soil_moisture")
    assert moisture["value"] == 31.5
    assert moisture["location"] == {"lat": 10.77, "lon": 106.7, "alt_m": None}
    assert one(rs, "valve_open")["value"] is True
    assert "payload" not in rs, "the decoded object replaces the raw bytes"
    assert one(rs, "lorawan_join")["value"] == "00aabbcc"
    assert one(rs, "lorawan_join")["device_time_ms"] == t - 1000
    assert (one(rs, "battery")["value"], one(rs, "battery")["unit"]) == (87.5, "%EL")
    assert (one(rs, "link_margin")["value"], one(rs, "link_margin")["unit"]) == (12, "dB")
    assert one(rs, "external_power")["value"] is False
    assert one(rs, "lorawan_error")["value"] == "UPLINK_CODEC: js codec: ReferenceError"
    gw.wait_metric("citygw_lorawan_messages_total", before + 1, server="ns1", event="downlink",
                   outcome="report")
    assert gw.metric("citygw_lorawan_downlink_reports_total", server="ns1", report="transmitted",
                     outcome="no_command_id") >= 1


def test_raw_codec_keeps_the_bytes(bridge):
    broker, gw, ns = bridge
    eui = new_dev_eui()
    dev = gw.add_device(kind="water_meter", dev_eui=eui, codec="raw")
    up = chirpstack_uplink(eui, f_cnt=1, time_ms=now_ms(), data=bytes.fromhex("00ff10a5"),
                           obj={"ignored": 1})
    ns.publish(chirpstack_topic(eui), up.SerializeToString())
    rs = wait_readings(gw, dev, 8)
    assert one(rs, "payload")["value"] == "00ff10a5"
    assert "ignored" not in rs, "a device codec wins over the network server's object"


def test_tts_documented_uplinks(brokers, gateway_factory):
    broker = brokers.mosquitto()
    gw = gateway_factory(config_toml=lorawan_toml(broker, name="ttn", server_type="ttn_v3"))
    wait_bridge_connected(gw, "ttn")
    ns = brokers.publisher(broker)

    # decoded_payload from the application's payload formatter
    eui = new_dev_eui()
    flood = gw.add_device(kind="flood", dev_eui=eui)
    t = now_ms() - 10_000
    msg = tts_uplink("flood-gauge-7", eui, f_cnt=2, time_ms=t, frm_payload=b"\x01",
                     decoded={"water_level": 1.42, "alarm": False},
                     gateways=[(-35, 5.2), (-88, -4.0)], sf=10, frequency=923_200_000)
    ns.publish(tts_topic("flood-gauge-7"), json.dumps(msg))
    rs = wait_readings(gw, flood, 8)
    wl = one(rs, "water_level")
    assert (wl["value"], wl["unit"], wl["device_time_ms"]) == (1.42, "m", t)
    assert one(rs, "alarm")["value"] is False
    assert one(rs, "rssi")["value"] == -35 and one(rs, "snr")["value"] == 5.2
    assert one(rs, "spreading_factor")["value"] == 10
    assert one(rs, "radio_frequency")["value"] == 923_200_000
    assert one(rs, "gateway_count")["value"] == 2
    assert one(rs, "frame_counter")["value"] == 2

    # frm_payload in Cayenne LPP, decoded by the gateway; f_cnt 0 is left out of the JSON.
    eui2 = new_dev_eui()
    bin_ = gw.add_device(kind="waste_bin", dev_eui=eui2, codec="lpp")
    msg = tts_uplink("bin-12", eui2, f_cnt=0, time_ms=t,
                     frm_payload=lpp(("add_percentage", (1, 73)), ("add_gps", (2, 21.0, 105.8, 9.0))))
    ns.publish(tts_topic("bin-12"), json.dumps(msg))
    rs = wait_readings(gw, bin_, 7)
    pct = one(rs, "percentage")
    assert pct["value"] == 73 and pct["location"] == {"lat": 21.0, "lon": 105.8, "alt_m": 9.0}
    assert one(rs, "frame_counter")["value"] == 0

    # An ABP device without a DevEUI is found by its TTS device id.
    abp = gw.add_device(unique_id("abp"), kind="parking")
    msg = tts_uplink(abp.id, None, f_cnt=5, time_ms=t, decoded={"occupied": True})
    ns.publish(tts_topic(abp.id), json.dumps(msg))
    assert one(wait_readings(gw, abp, 7), "occupied")["value"] is True

    # A join.
    join = {"end_device_ids": {"device_id": "bin-12", "dev_eui": eui2.upper(),
                               "dev_addr": "260B1234"},
            "received_at": "2026-01-02T03:04:05.123456789Z",
            "join_accept": {"session_key_id": "AXBSH1Pk6Z0G166BTeIlPA=="}}
    ns.publish(tts_topic("bin-12", "join"), json.dumps(join))
    j = wait_until(lambda: by_quantity(gw.readings(bin_.id)).get("lorawan_join"), 15)
    assert j[0]["value"] == "260B1234"


def test_tls_broker_is_verified(brokers, gateway_factory):
    """A network server's broker behind TLS: the bridge verifies it against the configured CA
    (and refuses one signed by another CA, counting the failures)."""
    pki = brokers.pki()
    broker = brokers.mosquitto(tls=pki)
    gw = gateway_factory(config_toml=lorawan_toml(broker, tls=True, ca_file=str(pki.ca)))
    wait_bridge_connected(gw)
    ns = brokers.publisher(broker)
    eui = new_dev_eui()
    dev = gw.add_device(kind="flood", dev_eui=eui)
    ns.publish(chirpstack_topic(eui), chirpstack_uplink(eui, 1, now_ms(), obj={"water_level": 0.4})
               .SerializeToString())
    assert one(wait_readings(gw, dev, 8), "water_level")["value"] == 0.4

    stranger = brokers.pki("another-ca")
    gw2 = gateway_factory(config_toml=lorawan_toml(broker, tls=True, ca_file=str(stranger.ca),
                                                    client_id="citygw-stranger"))
    gw2.wait_metric("citygw_lorawan_connection_errors_total", 2, server="ns1")
    assert gw2.metric("citygw_lorawan_connects_total", server="ns1") == 0
    assert "certificate" in gw2.log_tail(200).lower()
