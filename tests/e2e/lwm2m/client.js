// A real LwM2M 1.0 client (lwm2m-node-lib) driven by the citygw end-to-end tests.
//
//   node client.js HOST PORT ENDPOINT LIFETIME TEMPERATURE BATTERY
//
// Creates /3303/0 (temperature, 5700) and /3/0 (device, 9 = battery), registers, then reads
// commands on stdin, one per line:
//   set VALUE      set /3303/0/5700 (an observing server gets a notification)
//   deregister     de-register and exit
// Events are printed on stdout as JSON lines: {"event": "registered", "location": "rd/..."}.
'use strict';

const client = require('lwm2m-node-lib').client;
const readline = require('readline');

const [host, port, endpoint, lifetime, temperature, battery] = process.argv.slice(2);

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

client.registry.create('/3303/0', (err) => {
    if (err) return fail('create 3303', err);
    client.registry.setResource('/3303/0', '5700', temperature, (err) => {
        if (err) return fail('set 5700', err);
        client.registry.create('/3/0', (err) => {
            if (err) return fail('create 3', err);
            client.registry.setResource('/3/0', '9', battery, (err) => {
                if (err) return fail('set 9', err);
                client.register(host, port, null, endpoint, (err, info) => {
                    if (err) return fail('register', err);
                    emit({ event: 'registered', location: info.location });
                    commands(info);
                });
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
        } else if (cmd === 'deregister') {
            client.unregister(info, (err) => {
                if (err) return fail('deregister', err);
                emit({ event: 'deregistered' });
                process.exit(0);
            });
        }
    });
}
