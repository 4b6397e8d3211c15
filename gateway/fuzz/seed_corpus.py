"""Writes the seed corpus of the fuzz targets (gateway/src/fuzz) into gateway/fuzz/corpus/.

Valid examples of every input a target reads, built with the same third-party libraries the e2e
tests use (cbor2, chirpstack-api, pycayennelpp, aiocoap), plus a few classic edge cases. Crash
files (`crash-*`) found by fuzzing are added by hand and never rewritten by this script.

    .venv/bin/python gateway/fuzz/seed_corpus.py
"""

import base64
import datetime
import warnings
import json
import os
import struct

import cbor2
from aiocoap import Message, CON, NON, POST, PUT, GET, optiontypes
from aiocoap.numbers.codes import Code
from cayennelpp import LppFrame
from chirpstack_api import integration
from google.protobuf.json_format import MessageToJson

warnings.simplefilter("ignore", DeprecationWarning)
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def put(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# The gateway's flat JSON.
put("json", "flat", '{"temperature":21.5,"humidity":60,"ts":1780000000000,"seq":7}')
put("json", "values", '{"ts":"2026-05-01T10:00:00Z","lat":21.03,"lon":105.85,"values":{"pm2_5":{"v":12.5,"u":"ug/m3"},"door":true,"state":"ok"}}')
put("json", "array", '[{"quantity":"water_level","value":1.25,"unit":"m","time_ms":1780000000000}]')
put("json", "nan", '{"temperature":NaN}')

# SenML in JSON and CBOR (RFC 8428 examples and base values).
pack = [
    {"bn": "urn:dev:ow:10e2073a01080063:", "bt": 1.320067464e9, "bu": "%RH", "v": 20},
    {"u": "lon", "v": 24.30621}, {"u": "lat", "v": 60.07965},
    {"t": 60, "v": 20.3}, {"n": "door", "vb": True}, {"n": "label", "vs": "Phường Ba Đình"},
    {"n": "energy", "s": 1234.5, "u": "Wh"}, {"n": "rel", "t": -5, "v": 1},
]
put("senml_json", "rfc", json.dumps(pack, ensure_ascii=False))
put("senml_json", "minimal", '[{"n":"temperature","v":21.5}]')
put("senml_json", "vd", '[{"bver":10,"n":"blob","vd":"aGVsbG8"},{"n":"x_","v":1}]')
labels = {"bver": -1, "bn": -2, "bt": -3, "bu": -4, "bv": -5, "bs": -6, "n": 0, "u": 1, "v": 2,
          "vs": 3, "vb": 4, "s": 5, "t": 6, "ut": 7, "vd": 8}
put("senml_cbor", "rfc", cbor2.dumps([{labels[k]: v for k, v in r.items()} for r in pack]))
put("senml_cbor", "string_keys", cbor2.dumps(pack))
put("senml_cbor", "bytes_and_tags", cbor2.dumps([{0: "blob", 8: b"\x00\x01"}, {0: "t", 2: cbor2.CBORTag(1, 5)}]))


# Protobuf ReadingBatch, hand-encoded (field numbers from proto/citygw/v1/reading.proto).
def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def field(num, wire, payload):
    key = varint(num << 3 | wire)
    if wire == 2:
        return key + varint(len(payload)) + payload
    return key + payload


def reading(quantity, value, unit=b"", t=0, seq=None, loc=None):
    r = field(4, 2, quantity)
    if isinstance(value, float):
        r += field(5, 1, struct.pack("<d", value))
    elif isinstance(value, bool):
        r += field(6, 0, varint(int(value)))
    else:
        r += field(7, 2, value)
    if unit:
        r += field(8, 2, unit)
    if t:
        r += field(9, 0, varint(t))
    if seq is not None:
        r += field(14, 0, varint(seq))
    if loc:
        r += field(12, 2, b"".join(field(i + 1, 1, struct.pack("<d", x)) for i, x in enumerate(loc)))
    return field(1, 2, r)


put("protobuf", "batch", reading(b"temperature", 21.5, b"Cel", 1780000000000, 3)
    + reading(b"door", True) + reading(b"label", "Đống Đa".encode(), loc=(21.0, 105.8, 12.0)))
put("protobuf", "empty_value", reading(b"temperature", 0.0) + field(1, 2, field(4, 2, b"x")))

# Cayenne LPP frames from pycayennelpp.
f = LppFrame()
f.add_temperature(1, 21.5)
f.add_humidity(2, 60.5)
f.add_gps(3, 21.0285, 105.8542, 12.5)
f.add_barometer(4, 1013.2)
f.add_accelerometer(5, 0.1, -0.2, 0.98)
put("cayenne_lpp", "mixed", bytes(f))
g = LppFrame()
g.add_temperature(1, -4.1)
g.add_temperature(2, 30.0)
g.add_digital_input(3, 1)
g.add_load(4, -1.234) if hasattr(g, "add_load") else None
put("cayenne_lpp", "two_probes", bytes(g))
put("cayenne_lpp", "gps_only", bytes.fromhex("0188") + struct.pack(">i", 210285)[1:] + struct.pack(">i", 1058542)[1:] + struct.pack(">i", 1250)[1:])

# MQTT topics.
for i, t in enumerate(["devices/a/telemetry", "devices/dev-1/telemetry/senml-json", "devices/a/commands/#",
                       "devices/a/telemetry/", "devices//telemetry", "devices/+/telemetry", "#",
                       "devices/dev-1/+/x", "devices/a/telemetry/json/extra", "devices/a\u0000/telemetry"]):
    put("mqtt_topic", f"t{i}", t)


# CoAP datagrams: telemetry (plain with ?t= and CoAPS-style), Block1, LwM2M register/update.
def coap(msg, mid, token=b"\x01\x02"):
    msg.mid = mid
    msg.token = token
    return msg.encode()


put("coap_datagram", "post_json", coap(Message(mtype=CON, code=POST, uri_path=("t", "fz-1"), uri_query=("t=fuzz-secret-1",),
                                               payload=b'{"temperature":21.5}'), 1))
put("coap_datagram", "post_senml_cf", coap(Message(mtype=NON, code=POST, uri_path=("t", "fz-1"), content_format=110,
                                                   payload=b'[{"n":"t","v":1}]'), 2))
put("coap_datagram", "post_cbor_path", coap(Message(mtype=CON, code=POST, uri_path=("t", "fz-1", "senml-cbor"),
                                                    payload=cbor2.dumps([{0: "t", 2: 1.5}])), 3))
blk = Message(mtype=CON, code=POST, uri_path=("t", "fz-1"), payload=b'{"temperature":' + b" " * 10)
blk.opt.block1 = optiontypes.BlockOption.BlockwiseTuple(0, True, 0)
blk.payload = (b'{"temperature":21.5' + b" " * 20)[:16]
put("coap_datagram", "block1_first", coap(blk, 4))
last = Message(mtype=CON, code=POST, uri_path=("t", "fz-1"), payload=b"}")
last.opt.block1 = optiontypes.BlockOption.BlockwiseTuple(1, False, 0)
put("coap_datagram", "block1_last", coap(last, 5))
big = Message(mtype=CON, code=POST, uri_path=("t", "fz-1"), payload=b"x" * 32)
big.opt.block1 = optiontypes.BlockOption.BlockwiseTuple(0, True, 1)
big.opt.size1 = 1 << 20
put("coap_datagram", "block1_size1", coap(big, 6))
put("coap_datagram", "register", coap(Message(mtype=CON, code=POST, uri_path=("rd",),
                                              uri_query=("ep=fz-1", "lt=300", "lwm2m=1.1", "b=U"),
                                              content_format=40, payload=b"</1/0>,</3/0>,</3303/0>"), 7))
put("coap_datagram", "update", coap(Message(mtype=CON, code=POST, uri_path=("rd", "abc"), uri_query=("lt=60",)), 8))
put("coap_datagram", "send", coap(Message(mtype=CON, code=POST, uri_path=("dp",), content_format=110,
                                          payload=b'[{"bn":"/3303/0/","n":"5700","v":21.5}]'), 9))
put("coap_datagram", "get", coap(Message(mtype=CON, code=GET, uri_path=("t", "fz-1")), 10))
put("coap_datagram", "ping", bytes([0x40, 0x00, 0x00, 0x0b]))
put("coap_datagram", "notify", coap(Message(mtype=CON, code=Code.CONTENT, observe=3, content_format=0, payload=b"21.5"), 12))

# LwM2M values: text, TLV (resource, multiple resource, object instance), SenML.
put("lwm2m_values", "text", "21.5")
put("lwm2m_values", "tlv_resource", bytes([0xC4, 0x00, 0x41, 0xAC, 0x00, 0x00]))
put("lwm2m_values", "tlv_instance", bytes([0x08, 0x00, 0x0B, 0xE4, 0x16, 0x44, 0x41, 0xAC, 0x00, 0x00, 0xC1, 0x09, 0x50]))
put("lwm2m_values", "tlv_multi", bytes([0x86, 0x06, 0x41, 0x00, 0x01, 0x41, 0x01, 0x05]))
put("lwm2m_values", "senml_json", '[{"bn":"/3303/0/","n":"5700","v":21.5,"t":-1},{"n":"5701","vs":"Cel"}]')
put("lwm2m_values", "senml_cbor", cbor2.dumps([{-2: "/3303/0/", 0: "5700", 2: 21.5}]))

# ChirpStack v4 events: protobuf and its JSON mapping.
up = integration.UplinkEvent(deduplication_id="d-1", time=datetime.datetime(2026, 5, 1, 10, tzinfo=datetime.timezone.utc), f_cnt=12, f_port=2,
                             data=bytes(f), dr=5)
up.device_info.dev_eui = "70b3d57ed0000002"
up.device_info.application_id = "app-1"
up.object.update({"temperature": 21.5, "gps": {"latitude": 21.0, "longitude": 105.8}})
rx = up.rx_info.add()
rx.rssi, rx.snr, rx.gateway_id = -80, 7.5, "0016c001ff10a235"
put("chirpstack_event", "up.pb", up.SerializeToString())
put("chirpstack_event", "up.json", MessageToJson(up))
join = integration.JoinEvent(dev_addr="01020304")
join.device_info.dev_eui = "70b3d57ed0000002"
put("chirpstack_event", "join.json", MessageToJson(join))
st = integration.StatusEvent(margin=7, battery_level=87.5)
st.device_info.dev_eui = "70b3d57ed0000002"
put("chirpstack_event", "status.pb", st.SerializeToString())
log = integration.LogEvent(description="uplink f_cnt reset", code=integration.LogCode.UPLINK_F_CNT_RESET)
log.device_info.dev_eui = "70b3d57ed0000002"
put("chirpstack_event", "log.json", MessageToJson(log))

# The Things Stack v3 uplinks (the documented example's shape).
put("tts_event", "up.json", json.dumps({
    "end_device_ids": {"device_id": "lw-2", "dev_eui": "70B3D57ED0000002", "application_ids": {"application_id": "city-app"}},
    "received_at": "2026-05-01T10:00:00.123456789Z",
    "uplink_message": {"f_port": 2, "f_cnt": 42, "frm_payload": base64.b64encode(bytes(f)).decode(),
                       "decoded_payload": {"temperature": 21.5, "door": True},
                       "rx_metadata": [{"gateway_ids": {"gateway_id": "gw1"}, "rssi": -70, "snr": 9.25}],
                       "settings": {"data_rate": {"lora": {"bandwidth": 125000, "spreading_factor": 7}}, "frequency": "868100000"}},
}))
put("tts_event", "join.json", json.dumps({"end_device_ids": {"device_id": "lw-2", "dev_eui": "70B3D57ED0000002", "dev_addr": "260B1234"},
                                          "join_accept": {"session_key_id": "AYa"}}))
