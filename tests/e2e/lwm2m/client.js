// A real LwM2M 1.0 client (lwm2m-node-lib) driven by the citygw end-to-end tests.
//
//   node client.js HOST PORT ENDPOINT LIFETIME TEMPERATURE BATTERY [queue]
//
// Creates /3303/0 (temperature, 5700), /3/0 (device, 9 = battery) and /3311/0 (light control:
// 5850 on/off, 5851 dimmer), registers (binding U, or UQ with `queue`), then reads commands on
// stdin, one per line:
//   set VALUE      set /3303/0/5700 (an observing server gets a notification)
//   update         send a registration update (a queue-mode client is awake again)
//   deregister     de-register and exit
// Server requests it receives are printed too:
//   {"event": "write", "path": "/3311/0/5850", "value": "1"}   (a dimmer outside 0-100: 4.00)
//   {"event": "execute", "path": "/3/0/4", "args": ""}         (answered after 800 ms, so the
//                                                              answer is a separate response)
// Events are printed on stdout as JSON lines: {"event": "registered", "location": "rd/..."}.
'use strict';

const coap = require('coap');
const client = require('lwm2m-node-lib').client;
const readline = require('readline');

const [host, port, endpoint, lifetime, temperature, battery, mode] = process.argv.slice(2);

if (mode === 'queue') {
    // lwm2m-node-lib always registers with b=U; a queue-mode (LwM2M 1.0 UQ) client differs only
    // in that parameter, so its requests are rewritten on their way out.
    const request = coap.Agent.prototype.request;
    coap.Agent.prototype.request = function (url) {
        if (url && typeof url.query === 'string') {
            url.query = url.query.replace(/(^|&)b=U(&|$)/, '$1b=UQ$2');
        }
        return request.apply(this, arguments);
    };
}

function emit(obj) {
    process.stdout.write(JSON.stringify(obj) + '\n');
}

function fail(what, err) {
    emit({ event: 'error', what, error: String(err && (err.message || err.name || err)) });
    process.exit(1);
}

client.init({
    client: {
        lifetime: lifetime,
        version: '1.0',
        logLevel: 'FATAL',
        observe: { period: 3000 },
        ipProtocol: 'udp4',
        serverProtocol: 'udp4',
        formats: [{ name: 'lightweightm2m/text', value: 1541 }],
        writeFormat: 'lightweightm2m/text'
    }
});

// The server's Write and Execute requests, printed. The library takes the handler of an
// operation from its module for every listener it starts (a new one, on a new port, with each
// registration update); installing ours there means no request can reach a listener before it.
function onWrite(objectType, objectId, resourceId, value, callback) {
    const path = `/${objectType}/${objectId}/${resourceId}`;
    emit({ event: 'write', path, value: String(value) });
    const level = Number(value);
    if (path === '/3311/0/5851' && !(level >= 0 && level <= 100)) {
        const refused = new Error('dimmer outside 0-100');
        refused.code = '4.00';
        return callback(refused);
    }
    callback(null);
}

function onExecute(objectType, objectId, resourceId, args, callback) {
    emit({ event: 'execute', path: `/${objectType}/${objectId}/${resourceId}`, args: String(args || '') });
    setTimeout(() => callback(null), 800);
}

for (const [name, handler] of [['write', onWrite], ['execute', onExecute]]) {
    const service = require(`lwm2m-node-lib/lib/services/client/${name}`);
    const handle = service.handle;
    service.handle = (req, res) => handle(req, res, handler);
}

function light(callback) {
    client.registry.create('/3311/0', (err) => {
        if (err) return fail('create 3311', err);
        client.registry.setResource('/3311/0', '5850', '0', (err) => {
            if (err) return fail('set 5850', err);
            client.registry.setResource('/3311/0', '5851', '0', (err) => {
                if (err) return fail('set 5851', err);
                callback();
            });
        });
    });
}

client.registry.create('/3303/0', (err) => {
    if (err) return fail('create 3303', err);
    client.registry.setResource('/3303/0', '5700', temperature, (err) => {
        if (err) return fail('set 5700', err);
        client.registry.create('/3/0', (err) => {
            if (err) return fail('create 3', err);
            client.registry.setResource('/3/0', '9', battery, (err) => {
                if (err) return fail('set 9', err);
                light(() => client.register(host, port, null, endpoint, (err, info) => {
                    if (err) return fail('register', err);
                    emit({ event: 'registered', location: info.location });
                    commands(info);
                }));
            });
        });
    });
});

function commands(info) {
    const rl = readline.createInterface({ input: process.stdin });
    rl.on('line', (line) => {
        const [cmd, arg] = line.trim().split(/\s+/);
        if (cmd === 'set') {
            client.registry.setResource('/3303/0', '5700', arg, (err) => {
                if (err) return fail('set', err);
                emit({ event: 'set', value: arg });
            });
        } else if (cmd === 'update') {
            client.update(info, (err) => {
                if (err) return fail('update', err);
                emit({ event: 'updated' });
            });
        } else if (cmd === 'deregister') {
            client.unregister(info, (err) => {
                if (err) return fail('deregister', err);
                emit({ event: 'deregistered' });
                process.exit(0);
            });
        }
    });
}
