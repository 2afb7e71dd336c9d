export default function Home() {
  return <p>comfy-courier kit check</p>;
}
