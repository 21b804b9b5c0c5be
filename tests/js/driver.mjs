// Drives ONE official @krmx/client for tests/test_official_client.py.
//
//   node driver.mjs <install-dir>
//
// <install-dir> is the folder where the tests installed tests/js/package.json (it holds node_modules); the
// packages are loaded from there, so nothing is installed inside the repository.
//
// Protocol, one JSON object per line:
//   stdin  (commands): {"id": 1, "cmd": "connect", "url": "ws://127.0.0.1:1234/"}
//          cmd is one of connect {url}, link {username, auth?}, unlink, leave, disconnect {force?},
//          drop (terminate the socket without a close frame), send {message}, users, status, username.
//   stdout (results):  {"kind": "result", "id": 1, "ok": true, "value": ...}
//                      {"kind": "result", "id": 1, "ok": false, "error": "<Error.message>"}
//          (events):   {"kind": "event", "event": "join", "args": ["lisa"], "status": "linked",
//                       "username": "simon", "users": [{"username": ..., "isLinked": ...}]}
//          (fatal):    {"kind": "fatal", "error": "..."}  (an error outside any command)
// Every client event is printed from a catch-all listener, with the client's state right after the event.
// Results and events are printed in the order they happen. The driver exits when stdin closes.
import { createRequire } from 'node:module';
import path from 'node:path';
import readline from 'node:readline';

const installDir = process.argv[2];
if (!installDir) {
  process.stderr.write('usage: node driver.mjs <install-dir>\n');
  process.exit(2);
}
const require = createRequire(path.join(path.resolve(installDir), 'package.json'));
const WebSocket = require('ws');
const { createClient } = require('@krmx/client');

// The official client uses the global WebSocket (absent in Node 20): give it the one from 'ws'.
globalThis.WebSocket = WebSocket;

function write(record) {
  process.stdout.write(`${JSON.stringify(record)}\n`);
}

function errorText(error) {
  return error instanceof Error ? error.message : String(error);
}

process.on('uncaughtException', (error) => write({ kind: 'fatal', error: `uncaught: ${errorText(error)}` }));
process.on('unhandledRejection', (error) => write({ kind: 'fatal', error: `unhandled rejection: ${errorText(error)}` }));

const client = createClient({ logger: false });
client.all((event, ...args) => {
  write({
    kind: 'event',
    event,
    args,
    status: client.getStatus(),
    username: client.getUsername() ?? null,
    users: client.getUsers(),
  });
});

const commands = {
  connect: ({ url }) => client.connect(url),
  link: ({ username, auth }) => client.link(username, auth ?? undefined),
  unlink: () => client.unlink(),
  leave: () => client.leave(),
  disconnect: ({ force }) => client.disconnect(Boolean(force)),
  drop: () => {
    // A connection that drops (no close handshake). `socket` is the client's private 'ws' WebSocket.
    if (client.socket === undefined) {
      throw new Error(`no socket to drop when the client is ${client.getStatus()}`);
    }
    client.socket.terminate();
  },
  send: ({ message }) => client.send(message),
  users: () => client.getUsers(),
  status: () => client.getStatus(),
  username: () => client.getUsername() ?? null,
};

async function run(request) {
  const { id, cmd } = request;
  try {
    const command = commands[cmd];
    if (command === undefined) {
      throw new Error(`unknown driver command ${JSON.stringify(cmd)}`);
    }
    const value = await command(request);
    write({ kind: 'result', id, ok: true, value: value ?? null });
  } catch (error) {
    write({ kind: 'result', id, ok: false, error: errorText(error) });
  }
}

const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
lines.on('line', (line) => {
  if (line.trim() === '') {
    return;
  }
  let request;
  try {
    request = JSON.parse(line);
  } catch (error) {
    write({ kind: 'fatal', error: `bad command line ${JSON.stringify(line)}: ${errorText(error)}` });
    return;
  }
  run(request); // not awaited: a pending link must not block the next command
});
lines.on('close', () => {
  // The test is done with this client: close its socket (if any) and exit.
  if (client.socket !== undefined) {
    client.socket.terminate();
  }
  process.exit(0);
});
