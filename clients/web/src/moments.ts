// Moments written for a person, in a named time zone: "Mon 30 Nov 2026, 08:00". A
// schedule's ticks are read in the schedule's own zone (a cron at 08:00 in Berlin is
// 08:00 there, wherever the reader is), so the page never writes one in the browser's
// zone without saying which. The words are the page's own (English, like the rest of it),
// not the browser's locale's: "Sept" or "lun." would not match the page around them.

const WEEKDAYS = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"] as const;
const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"] as const;

/** The browser's time zone (IANA name), "UTC" when it has none to say. */
export function browserZone(): string {
  return Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
}

const formats = new Map<string, Intl.DateTimeFormat | null>();

/** A zone's calendar reading (null for a zone this browser does not know). */
function reader(zone: string): Intl.DateTimeFormat | null {
  let found = formats.get(zone);
  if (found === undefined) {
    try {
      found = new Intl.DateTimeFormat("en-US", {
        timeZone: zone,
        year: "numeric",
        month: "numeric",
        day: "numeric",
        hour: "numeric",
        minute: "numeric",
        second: "numeric",
        hourCycle: "h23",
      });
    } catch {
      found = null;
    }
    formats.set(zone, found);
  }
  return found;
}

interface Reading {
  year: number;
  month: number;
  day: number;
  hour: number;
  minute: number;
  second: number;
}

function read(date: Date, zone: string): Reading {
  const format = reader(zone) ?? reader("UTC");
  const parts: Record<string, number> = {};
  for (const part of format?.formatToParts(date) ?? []) {
    if (part.type !== "literal") parts[part.type] = Number(part.value);
  }
  return {
    year: parts.year ?? date.getUTCFullYear(),
    month: parts.month ?? date.getUTCMonth() + 1,
    day: parts.day ?? date.getUTCDate(),
    hour: parts.hour ?? date.getUTCHours(),
    minute: parts.minute ?? date.getUTCMinutes(),
    second: parts.second ?? date.getUTCSeconds(),
  };
}

/** The zone a moment is written in: `zone` if this browser knows it, else "UTC" (which is
 *  then what the page names, so the time shown is never read in the wrong zone). */
export function knownZone(zone: string): string {
  return zone && reader(zone) !== null ? zone : "UTC";
}

const two = (n: number): string => String(n).padStart(2, "0");

/** "Mon 30 Nov 2026", the calendar day of a `YYYY-MM-DD` (as QueryUsage names days). */
export function calendarDay(day: string, { year = true }: { year?: boolean } = {}): string {
  const [y = 0, m = 1, d = 1] = day.split("-").map(Number);
  const weekday = WEEKDAYS[new Date(Date.UTC(y, m - 1, d)).getUTCDay()] ?? "";
  return `${weekday} ${d} ${MONTHS[m - 1] ?? ""}${year ? ` ${y}` : ""}`;
}

/** "Mon 30 Nov 2026, 08:00" (with `seconds`, "08:00:02") as the clocks of `zone` read it. */
export function dateTime(date: Date, zone: string, seconds = false): string {
  const r = read(date, knownZone(zone));
  const day = calendarDay(`${r.year}-${two(r.month)}-${two(r.day)}`);
  return `${day}, ${two(r.hour)}:${two(r.minute)}${seconds ? `:${two(r.second)}` : ""}`;
}

/** Whether moments shown together need their seconds to tell them apart or say them
 *  exactly: any of them off the minute (a tick every 2 s, a six-field cron). */
export function needsSeconds(dates: Date[]): boolean {
  return dates.some((d) => d.getUTCSeconds() !== 0);
}
