// The official Krmx server (@krmx/server 0.5.5, from npm) running the client test app of tests/test_client.py,
// so the Python client's suite runs against the reference implementation as well as against ours.
//
//   node reference_server.cjs <install-dir> [--port PORT]
//
// <install-dir> is the folder where the tests installed tests/js/package.json (it holds node_modules); the
// packages are loaded from there, nothing is installed inside the repository. PORT 0 (the default) picks a free
// port. Once listening it prints one line on stdout: {"port": <port>}. SIGTERM or SIGINT closes the server the
// Krmx way (every user leaves) and exits 0. KRMX_REF_VERBOSE=1 logs Krmx's own lines on stderr.
//
// The app (the same as the in-process one of tests/test_client.py):
//   authenticate: a username starting with 'deny', or a username or auth named by test/deny, is rejected with
//                 'denied by app'.
//   test/echo            -> the sender gets {type: 'test/echoed', payload} (no payload key when none was sent)
//   test/broadcast       -> every linked user gets {type: 'test/broadcasted', payload: {from, data}}
//   test/send {to, data} -> user `to` gets {type: 'test/sent', payload: {from, data}}
//   test/kick|join|unlink {username} -> server.kick / join / unlink of that user
//   test/deny {username} -> later link requests for that user, or with that auth, are rejected ('denied by app')
//   test/get-users       -> the sender gets {type: 'test/users', payload: server.getUsers()}
//   an error             -> the sender gets {type: 'test/error', payload: {request, error}}
'use strict';

const path = require('node:path');
const { createRequire } = require('node:module');

const installDir = process.argv[2];
if (!installDir || installDir.startsWith('--')) {
  process.stderr.write('usage: node reference_server.cjs <install-dir> [--port PORT]\n');
  process.exit(2);
}
let port = 0;
for (let i = 3; i < process.argv.length; i += 1) {
  if (process.argv[i] === '--port' && /^\d+$/.test(process.argv[i + 1] ?? '')) {
    port = Number(process.argv[i + 1]);
    i += 1;
  } else {
    process.stderr.write(`unknown argument: ${process.argv[i]}\n`);
    process.exit(2);
  }
}

const requireFromInstall = createRequire(path.join(path.resolve(installDir), 'package.json'));
const { createServer } = requireFromInstall('@krmx/server');

const verbose = process.env.KRMX_REF_VERBOSE === '1';
const server = createServer({
  logger: (severity, ...args) => {
    if (verbose || severity === 'error') {
      console.error(`[${severity}] [krmx]`, ...args);
    }
  },
});

const denied = new Set();
server.on('authenticate', (username, info, reject) => {
  if (username.startsWith('deny') || denied.has(username) || (info.auth !== undefined && denied.has(info.auth))) {
    reject('denied by app');
  }
});

function hasKey(object, key) {
  return object !== null && typeof object === 'object' && !Array.isArray(object)
    && Object.prototype.hasOwnProperty.call(object, key);
}

function errorText(error) {
  return error instanceof Error ? error.message : String(error);
}

function fail(username, request, error) {
  server.send(username, { type: 'test/error', payload: { request, error } });
}

function withUsername(username, message, action) {
  if (!hasKey(message.payload, 'username') || typeof message.payload.username !== 'string') {
    fail(username, message.type, 'invalid request');
    return;
  }
  try {
    action(message.payload.username);
  } catch (error) {
    fail(username, message.type, errorText(error));
  }
}

server.on('message', (username, message) => {
  const hasPayload = hasKey(message, 'payload');
  switch (message.type) {
  case 'test/echo':
    server.send(username, hasPayload ? { type: 'test/echoed', payload: message.payload } : { type: 'test/echoed' });
    break;
  case 'test/broadcast':
    server.broadcast({ type: 'test/broadcasted', payload: { from: username, data: hasPayload ? message.payload : null } });
    break;
  case 'test/send': {
    const payload = message.payload;
    if (!hasKey(payload, 'to') || typeof payload.to !== 'string') {
      fail(username, message.type, 'invalid request');
      break;
    }
    try {
      server.send(payload.to, { type: 'test/sent', payload: { from: username, data: hasKey(payload, 'data') ? payload.data : null } });
    } catch (error) {
      fail(username, message.type, errorText(error));
    }
    break;
  }
  case 'test/kick':
    withUsername(username, message, (target) => server.kick(target));
    break;
  case 'test/join':
    withUsername(username, message, (target) => server.join(target));
    break;
  case 'test/unlink':
    withUsername(username, message, (target) => server.unlink(target));
    break;
  case 'test/deny':
    withUsername(username, message, (target) => denied.add(target));
    break;
  case 'test/get-users':
    server.send(username, { type: 'test/users', payload: server.getUsers() });
    break;
  default:
    break;
  }
});

let closing = false;
function shutdown() {
  if (closing) {
    return;
  }
  closing = true;
  server.close().then(() => process.exit(0), (error) => {
    console.error('[error] close failed:', error);
    process.exit(1);
  });
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

server.listen(port).then((listening) => {
  process.stdout.write(`${JSON.stringify({ port: listening })}\n`);
}, (error) => {
  console.error(`[error] cannot listen: ${errorText(error)}`);
  process.exit(1);
});
