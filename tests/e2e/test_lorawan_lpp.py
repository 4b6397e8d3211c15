"""Cayenne LPP: frames encoded by pycayennelpp (every type it supports) reach the gateway through
a LoRaWAN network server's broker and decode to the values the library itself reports."""

from __future__ import annotations

import math

import pytest
from cayennelpp import LppFrame

from support import now_ms
from support.lorawan import (chirpstack_topic, chirpstack_uplink, lorawan_toml, new_dev_eui,
                             wait_bridge_connected, wait_readings)

# Every type pycayennelpp knows: IPSO id -> (a value tuple to encode, the gateway's reading names
# in order, unit). GPS (136) is not a reading but the frame's location.
TYPES = {
    0: ((1,), ["digital_input"], ""),
    1: ((0,), ["digital_output"], ""),
    2: ((-12.34,), ["analog_input"], ""),
    3: ((3.3,), ["analog_output"], ""),
    100: ((4_000_000_000,), ["generic_sensor"], ""),
    101: ((812,), ["lux"], "lx"),
    102: ((1,), ["presence"], ""),
    103: ((-5.3,), ["temperature"], "Cel"),
    104: ((63.5,), ["humidity"], "%RH"),
    113: ((0.012, -1.234, 0.981), ["accelerometer_x", "accelerometer_y", "accelerometer_z"], "[g]"),
    115: ((1013.2,), ["pressure"], "hPa"),
    116: ((3.61,), ["voltage"], "V"),
    117: ((1.234,), ["current"], "A"),
    118: ((868_100_000,), ["frequency"], "Hz"),
    120: ((73,), ["percentage"], "%"),
    121: ((-42,), ["altitude"], "m"),
    122: ((-1.5,), ["load"], "kg"),
    125: ((415,), ["concentration"], "ppm"),
    128: ((1500,), ["power"], "W"),
    130: ((12.345,), ["distance"], "m"),
    131: ((1234.567,), ["energy"], "kWh"),
    132: ((270,), ["direction"], "deg"),
    133: ((1_700_000_000,), ["unix_time"], "s"),
    134: ((-1.5, 2.25, 90.0), ["gyrometer_x", "gyrometer_y", "gyrometer_z"], "deg/s"),
    135: ((255, 128, 0), ["colour_r", "colour_g", "colour_b"], ""),
    136: ((21.0285, -105.8542, -12.5), [], ""),
    142: ((1,), ["switch"], ""),
}


@pytest.fixture
def bridge(brokers, gateway_factory):
    broker = brokers.mosquitto()
    gw = gateway_factory(config_toml=lorawan_toml(broker))
    wait_bridge_connected(gw)
    return gw, brokers.publisher(broker)


def test_the_table_covers_every_pycayennelpp_type():
    from cayennelpp.lpp_type import LppType
    known = {t for t in range(256) if LppType.get_lpp_type(t)}
    assert known == set(TYPES), f"pycayennelpp types not covered: {known ^ set(TYPES)}"


def test_every_type_decodes_to_the_library_values(bridge):
    gw, ns = bridge
    eui = new_dev_eui()
    dev = gw.add_device(kind="generic", dev_eui=eui, codec="lpp")
    frame = LppFrame()
    for channel, (type_, (values, _, _)) in enumerate(TYPES.items(), start=1):
        frame.add_by_type(type_, channel, values)
    payload = bytes(frame)
    assert len(payload) <= 242, "one LoRaWAN frame"
    # What the library reads back from its own bytes is the reference.
    library = {int(d.type): d.value for d in LppFrame.from_bytes(payload).data}

    up = chirpstack_uplink(eui, f_cnt=3, time_ms=now_ms(), data=payload)
    ns.publish(chirpstack_topic(eui), up.SerializeToString())
    # the values, and the 7 radio metadata readings
    rs = wait_readings(gw, dev, sum(len(names) for _, names, _ in TYPES.values()) + 7)

    lat, lon, alt = library[136]
    for type_, (_, names, unit) in TYPES.items():
        for name, want in zip(names, library[type_]):
            assert name in rs, f"type {type_}: no {name} reading"
            (r,) = rs[name]
            assert math.isclose(r["value"], want, rel_tol=1e-9, abs_tol=1e-9), (type_, name, r, want)
            assert r["unit"] == unit, (name, r)
            # GPS is the location of every reading of the frame.
            assert r["location"]["lat"] == pytest.approx(lat, abs=1e-9)
            assert r["location"]["lon"] == pytest.approx(lon, abs=1e-9)
            assert r["location"]["alt_m"] == pytest.approx(alt, abs=1e-9)


def test_one_type_on_several_channels_keeps_the_channels_apart(bridge):
    gw, ns = bridge
    eui = new_dev_eui()
    dev = gw.add_device(kind="weather", dev_eui=eui, codec="lpp")
    frame = LppFrame()
    frame.add_temperature(3, 27.2)
    frame.add_temperature(5, 25.5)
    frame.add_humidity(6, 40.0)
    up = chirpstack_uplink(eui, f_cnt=9, time_ms=now_ms(), data=bytes(frame))
    ns.publish(chirpstack_topic(eui), up.SerializeToString())
    rs = wait_readings(gw, dev, 3 + 7)
    assert rs["temperature_3"][0]["value"] == 27.2
    assert rs["temperature_5"][0]["value"] == 25.5
    assert rs["humidity"][0]["value"] == 40.0, "a type on one channel keeps the canonical name"


def test_direct_mqtt_devices_can_send_lpp(gw):
    """The decoder is a plain payload format: an MQTT device publishes LPP on `/lpp`."""
    dev = gw.add_device(kind="weather")
    frame = LppFrame()
    frame.add_temperature(1, 21.5)
    frame.add_barometer(2, 1008.4)
    with gw.connected_client(dev) as c:
        assert c.publish(dev.topic + "/lpp", bytes(frame)) == 0
    rs = wait_readings(gw, dev, 2)
    assert rs["temperature"][0]["value"] == 21.5 and rs["temperature"][0]["protocol"] == "mqtt"
    assert (rs["pressure"][0]["value"], rs["pressure"][0]["unit"]) == (1008.4, "hPa")
