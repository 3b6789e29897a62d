// A consumer in another language that relies only on events-bridge's documented message
// contract (README, "What is published"): exchange `adobe.events` (topic), routing key
// `<event code>.<job status>`, persistent JSON bodies, message_id = the Adobe event id,
// headers `job-id` and `job-status`. It needs nothing of the bridge's code.
//
//   cd deploy/examples/node && npm install && node consumer.js ['*.succeeded']
//
// Environment: BRIDGE_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/),
// EXAMPLE_QUEUE (default examples.node), EXAMPLE_MAX (stop after N messages; default: never).
"use strict";

const amqp = require("amqplib");

const url = process.env.BRIDGE_AMQP_URL || "amqp://guest:guest@127.0.0.1:5672/";
const queueName = process.env.EXAMPLE_QUEUE || "examples.node";
const bindingKey = process.argv[2] || "*.succeeded";
const max = Number(process.env.EXAMPLE_MAX || 0);

// Delivery is at least once: remember recent event ids and skip repeats (a bounded window).
const seen = new Map();
const SEEN_LIMIT = 10000;

function remember(id) {
  seen.set(id, Date.now());
  if (seen.size > SEEN_LIMIT) seen.delete(seen.keys().next().value);
}

async function main() {
  const connection = await amqp.connect(url);
  const channel = await connection.createChannel();
  await channel.assertQueue(queueName, { durable: true, arguments: { "x-queue-type": "quorum" } });
  await channel.bindQueue(queueName, "adobe.events", bindingKey);
  await channel.prefetch(16);
  console.error(`consuming ${queueName} bound to adobe.events with '${bindingKey}'`);
  let count = 0;
  await channel.consume(queueName, (message) => {
    const eventId = message.properties.messageId;
    const headers = message.properties.headers || {};
    if (seen.has(eventId)) {
      channel.ack(message);
      return;
    }
    try {
      const event = JSON.parse(message.content.toString("utf8"));
      const envelope = event.specversion ? "cloudevents" : "adobe_io";
      console.log(JSON.stringify({
        event_id: eventId,
        event_code: message.properties.type,
        routing_key: message.fields.routingKey,
        job_id: headers["job-id"] || null,
        job_status: headers["job-status"] || null,
        envelope,
      }));
      remember(eventId);
      channel.ack(message);
    } catch (error) {
      console.error(`cannot handle ${eventId}: ${error.message}`);
      channel.nack(message, false, false); // dead-letter it, if the queue has a DLX
    }
    count += 1;
    if (max && count >= max) {
      channel.close().then(() => connection.close());
    }
  });
}

main().catch((error) => {
  console.error(`consumer failed: ${error.message}`);
  process.exit(1);
});
