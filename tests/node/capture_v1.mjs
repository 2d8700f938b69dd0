// Sends events with posthog-node in its capture v1 mode (POSTHOG_CAPTURE_MODE=v1) and prints,
// as one JSON line, the uuids it sent and the errors its client emitted.
// Usage: POSTHOG_CAPTURE_MODE=v1 node capture_v1.mjs <host> <api key> <how many events>
import { randomUUID } from 'node:crypto'
import { PostHog } from 'posthog-node'

const [host, apiKey, count] = process.argv.slice(2)
const client = new PostHog(apiKey, {
  host,
  flushAt: 1000,
  flushInterval: 0,
  fetchRetryCount: 1,
  fetchRetryDelay: 10,
})
const errors = []
client.on('error', (error) => {
  errors.push({
    name: error.name,
    message: error.message,
    drops: error.drops ?? [],
    retryExhausted: error.retryExhausted ?? [],
  })
})
const uuids = []
for (let i = 0; i < Number(count); i++) {
  const uuid = randomUUID()
  uuids.push(uuid)
  client.capture({
    distinctId: `node-user-${i}`,
    event: 'node_event',
    uuid,
    properties: { i, $ignore_sent_at: true },
  })
}
// posthog-node waits out its retry backoff on an unref'd timer; with nothing else to do,
// node would exit (code 13) before the retry is sent. Keep the event loop alive meanwhile.
const keepAlive = setInterval(() => {}, 1000)
await client.shutdown()
clearInterval(keepAlive)
console.log(JSON.stringify({ uuids, errors }))
